"""The settings of an evaluation are checked once, where ``run_evaluation`` is entered, and
passed down as a typed, frozen ``EvalSettings`` (issue 21)."""

import dataclasses

import pytest
from helpers import eval_config, write_benchmark
from omegaconf import OmegaConf

from spar import eval_settings, evaluation
from spar.config import SettingError
from spar.eval_settings import DatasetSettings, EvalSettings


def _record_backbones(monkeypatch):
    """Replace ``create_backbone`` where evaluation imports it; returns the list of its calls."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        raise AssertionError("no model may be built")

    monkeypatch.setattr(evaluation, "create_backbone", recording)
    return calls


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("precision=fp64", "precision must be one of"),
        ("num_workers=-1", "num_workers"),
        ("dataset.bounds=[128]", "dataset.bounds"),
        ("save_predictions=3", "save_predictions"),
    ],
)
def test_a_bad_value_fails_before_any_model_or_data(tmp_path, monkeypatch, override, message):
    calls = _record_backbones(monkeypatch)
    inner = []
    monkeypatch.setattr(evaluation, "_evaluate", lambda *args: inner.append(args))
    cfg = eval_config("dataset=cityscapes", f"dataset.root={tmp_path / 'nowhere'}", override)
    with pytest.raises(SettingError, match=message):
        evaluation.run_evaluation(cfg, tmp_path / "run")
    assert calls == [] and inner == []  # refused while checking, before the inner function
    assert not (tmp_path / "run").exists()


def test_compile_with_teacher_features_fails_before_any_model(tmp_path, monkeypatch):
    calls = _record_backbones(monkeypatch)
    write_benchmark("cityscapes", tmp_path / "data")
    cfg = eval_config(
        "dataset=cityscapes",
        f"dataset.root={tmp_path / 'data'}",
        "features=teacher",
        "compile=true",
    )
    with pytest.raises(ValueError, match="use teacher.compile"):
        evaluation.run_evaluation(cfg, tmp_path / "run")
    assert calls == []


def test_the_object_passed_down_is_the_typed_frozen_settings(tmp_path, monkeypatch):
    captured = []
    monkeypatch.setattr(evaluation, "_evaluate", lambda settings, out: captured.append(settings))
    cfg = eval_config(
        "dataset=cityscapes",
        f"dataset.root={tmp_path / 'data'}",
        "features=teacher",
        "teacher.stride=32",
        "precision=fp32",
    )
    evaluation.run_evaluation(cfg, tmp_path / "run")
    (settings,) = captured
    assert type(settings) is EvalSettings
    assert type(settings.dataset) is DatasetSettings
    assert settings.features == "teacher"
    assert settings.teacher["stride"] == 32
    assert settings.precision == "fp32"
    assert settings.device == "cpu" and settings.num_workers == 0
    assert settings.show_progress is False and settings.save_predictions is False
    assert settings.templates == "single"
    assert settings.backbone["name"] == "tiny" and settings.checkpoint is None
    assert settings.dataset.name == "cityscapes"
    assert settings.dataset.root == str(tmp_path / "data")
    assert settings.dataset.bounds == (128, 96)
    assert settings.dataset.logit_scale == 40.0
    assert len(settings.dataset.classes) == 19  # Cityscapes' 19 classes, read at the check
    assert settings.dataset.classes[0] == ("road",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.precision = "bf16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.dataset.bounds = (64, 48)


def test_a_run_checks_and_reads_the_class_names_once(tmp_path, monkeypatch):
    checks, reads = [], []
    original_check = eval_settings.check_eval_settings
    original_read = eval_settings.load_class_names
    monkeypatch.setattr(
        eval_settings,
        "check_eval_settings",
        lambda config: checks.append(1) or original_check(config),
    )
    monkeypatch.setattr(
        eval_settings, "load_class_names", lambda path: reads.append(path) or original_read(path)
    )
    write_benchmark("cityscapes", tmp_path / "data")
    cfg = eval_config("dataset=cityscapes", f"dataset.root={tmp_path / 'data'}")
    results = evaluation.run_evaluation(cfg, tmp_path / "run")
    assert results["num_images"] == 3
    assert len(checks) == 1 and len(reads) == 1


def test_a_notebook_dict_and_a_hydra_config_give_equal_settings(tmp_path):
    cfg = eval_config("dataset=cityscapes", f"dataset.root={tmp_path / 'data'}")
    notebook = OmegaConf.to_container(cfg, resolve=True)
    from_hydra, from_dict = EvalSettings.from_config(cfg), EvalSettings.from_config(notebook)
    assert from_hydra == from_dict
    assert isinstance(from_hydra.record, dict)  # the recorded config is a plain dict either way
    assert from_hydra.record == notebook


def test_a_hand_written_notebook_dict_takes_the_defaults(tmp_path):
    """The keys a notebook may leave out take the library's defaults."""
    settings = EvalSettings.from_config(
        {
            "features": "student",
            "backbone": {"name": "tiny"},
            "dataset": {
                "name": "cityscapes",
                "root": str(tmp_path),
                "bounds": [128, 96],
                "logit_scale": 40.0,
            },
        }
    )
    assert settings.templates == "imagenet80"
    assert settings.device == "auto" and settings.precision == "auto"
    assert settings.num_workers == 0 and settings.show_progress is True
    assert settings.save_predictions is False and settings.compile is False
    assert settings.max_image_pixels == 100_000_000
    assert settings.dataset.split is None and settings.dataset.logit_bias == 0.0
    assert settings.dataset.prob_threshold is None and settings.dataset.area_threshold is None
    assert settings.refine is None and settings.upsample is None and settings.teacher is None
