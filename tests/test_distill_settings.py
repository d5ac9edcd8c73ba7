"""One typed, frozen settings object per training run: ``prepare`` checks the config once
(``training_settings``) and hands typed parts down; a notebook dict and a Hydra config give the
same settings; a bad value stops the run before any model is built."""

import dataclasses
from pathlib import Path

import pytest
from helpers import train_config, write_scene_images
from omegaconf import OmegaConf

from spar.config import SettingError
from spar.distill import AugmentationRecipe, DistillationSettings, DistillationViews
from spar.distill import run as run_module
from spar.models.teacher_config import TeacherSettings


class Stop(Exception):
    """Raised in place of building the student: the settings were made by then."""


def small_config(tmp_path, *overrides):
    images = write_scene_images(tmp_path / "images", count=3, size=(120, 160))
    return train_config(
        tmp_path,
        f"train_images.root={images}",
        "train_images.augment.bounds=[160,128]",
        "train_images.augment.min_crop=64",
        "train_images.augment.min_short_side=64",
        "train_images.draws_per_image=2",
        "train_images.augment_seed=5",
        "heldout.num_images=1",
        "heldout.sizes=[[160,128]]",
        "teacher.window=96",
        "teacher.stride=[24,32]",
        *overrides,
    )


def capture_settings(monkeypatch) -> list:
    """Record every ``training_settings`` result that ``prepare`` makes."""
    made = []
    real = run_module.training_settings

    def recording(config):
        made.append(real(config))
        return made[-1]

    monkeypatch.setattr(run_module, "training_settings", recording)
    return made


def test_prepare_checks_once_and_hands_typed_parts_down(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    made = capture_settings(monkeypatch)
    teacher_calls, view_calls = [], []
    real_build = run_module.build_teacher

    def build(backbone, settings, precision, **kwargs):
        teacher_calls.append((settings, precision))
        return real_build(backbone, settings, precision, **kwargs)

    class Views(DistillationViews):
        def __init__(self, *args, **kwargs):
            view_calls.append((args, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(run_module, "build_teacher", build)
    monkeypatch.setattr(run_module, "DistillationViews", Views)
    setup = run_module.prepare(cfg)

    assert len(made) == 1 and setup.settings is made[0]
    settings = setup.settings
    assert isinstance(settings, DistillationSettings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.device = "cuda"
    # The teacher gets the typed teacher node, not the dict with cache keys.
    ((teacher_settings, precision),) = teacher_calls
    assert teacher_settings == TeacherSettings(window=96, stride=(24, 32))
    assert precision == "auto"
    assert tuple(setup.targets.teacher.window) == (96, 96)
    assert tuple(setup.targets.teacher.stride) == (24, 32)
    # The views get the typed recipe and the train_images values.
    ((args, kwargs),) = view_calls
    assert isinstance(args[2], AugmentationRecipe)
    assert args[2].bounds == (160, 128) and args[2].min_crop == 64
    assert kwargs["augment_seed"] == 5 and kwargs["draws_per_image"] == 2
    assert kwargs["fixed_views"] is True
    assert len(setup.views) == 2 * 2  # 3 images, 1 held out, 2 draws each
    # The other parts, typed.
    assert settings.heldout.sizes == ((160, 128),) and settings.heldout.num_images == 1
    assert settings.heldout.root is None
    assert settings.train_images.root == tmp_path / "images"
    assert settings.train_images.max_images is None
    assert settings.teacher.cache is True and settings.teacher.cache_dir == tmp_path / "cache"
    assert settings.backbone.name == "tiny"
    assert settings.device == "cpu" and settings.compile is False
    assert settings.resume is None and settings.resume_allow == ()
    assert settings.max_image_pixels == 100_000_000
    assert settings.optim.lr == 1e-3 and settings.trainer.epochs == 8  # the demo preset
    assert setup.optim is settings.optim and setup.trainer is settings.trainer
    # The dict stays the run record, as resolved.
    assert isinstance(setup.config, dict)
    assert setup.config["teacher"]["stride"] == [24, 32]


def settings_before_the_student(cfg, monkeypatch) -> DistillationSettings:
    made = capture_settings(monkeypatch)

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(run_module, "create_backbone", stop)
    with pytest.raises(Stop):
        run_module.prepare(cfg)
    (settings,) = made
    return settings


def test_a_notebook_dict_and_a_hydra_config_give_equal_settings(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, "heldout.root=null", "resume_allow=[]")
    notebook = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(notebook, dict)
    from_hydra = settings_before_the_student(cfg, monkeypatch)
    monkeypatch.undo()
    from_notebook = settings_before_the_student(notebook, monkeypatch)
    assert from_hydra == from_notebook
    assert from_notebook.teacher.settings.stride == (24, 32)
    assert isinstance(from_notebook.train_images.root, Path)


def edit(config: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


@pytest.mark.parametrize(
    ("key", "value", "error", "message"),
    [
        (
            "train_images.augment.hue",
            0.1,
            ValueError,
            r"unknown augmentation setting\(s\) \['hue'\]",
        ),
        ("resume_allow", ["optim.lr"], SettingError, "given without resume="),
        ("heldout.sizes", [[160]], SettingError, "heldout.sizes"),
        ("teacher.stride", [200, 200], SettingError, r"teacher.stride \[200, 200\] is larger"),
    ],
)
def test_a_bad_value_fails_before_any_model_is_built(
    tmp_path, monkeypatch, key, value, error, message
):
    notebook = edit(OmegaConf.to_container(small_config(tmp_path), resolve=True), key, value)
    built = []
    monkeypatch.setattr(run_module, "create_backbone", lambda *a, **k: built.append(a))
    monkeypatch.setattr(run_module, "build_teacher", lambda *a, **k: built.append(a))
    with pytest.raises(error, match=message):
        run_module.prepare(notebook)
    assert built == []
    assert not (tmp_path / "cache").exists()
