"""The refinement stages inside the segmenter, evaluation and the segment script."""

import re

import pytest
import torch
from helpers import (
    CONFIGS,
    eval_config,
    miou_from_pngs,
    refine_overrides,
    run_script,
    write_benchmark,
    write_scene_images,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spar.evaluation import run_evaluation
from spar.refine import LPOSS, AnyUpUpsampler, build_stages
from spar.segmentation import OpenVocabSegmenter
from spar.tools.speed import format_stage_table, measure_stages, stage_combinations


def _stage_config(tmp_path, refine, upsample):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=refine_overrides(tmp_path, refine, upsample))
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    ("refine", "upsample"), [("lposs", "bilinear"), ("none", "anyup"), ("lposs_plus", "anyup")]
)
def test_stages_combine_in_the_python_api(tmp_path, tiny_backbone, refine, upsample):
    stages = build_stages(_stage_config(tmp_path, refine, upsample))
    assert isinstance(stages["refiner"], LPOSS) == (refine != "none")
    assert isinstance(stages["upsampler"], AnyUpUpsampler) == (upsample == "anyup")
    assert stages["refiner"] is None or stages["refiner"].pixel_refine == (refine == "lposs_plus")
    classes = ["sky", "road", "car"]
    options = {"templates": "single"}
    plain = OpenVocabSegmenter.from_backbone(tiny_backbone, classes, **options)
    staged = OpenVocabSegmenter.from_backbone(tiny_backbone, classes, **options, **stages)
    images = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        logits = staged.name_logits(images, output_size=(30, 42))
        mask = staged.predict(images)
        reference = plain.name_logits(images, output_size=(30, 42))
    assert logits.shape == reference.shape == (1, 3, 30, 42)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, reference)
    assert mask.shape == (1, 40, 56) and int(mask.max()) < 3


def test_eval_with_lposs_plus_and_anyup_writes_predictions_that_give_its_miou(tmp_path):
    write_benchmark("voc21", tmp_path / "voc", count=2)
    cfg = eval_config(
        "dataset=voc21",
        f"dataset.root={tmp_path / 'voc'}",
        "dataset.bounds=[64,48]",
        "save_predictions=true",
        *refine_overrides(tmp_path),
    )
    results = run_evaluation(cfg, tmp_path / "eval")
    assert results["config"]["refine"]["name"] == "lposs_plus"
    assert results["config"]["upsample"]["name"] == "anyup"
    assert results["num_images"] == 2
    recomputed, _ = miou_from_pngs("voc21", tmp_path / "voc", tmp_path / "eval" / "predictions")
    assert results["miou"] == pytest.approx(recomputed, abs=1e-9)


def test_eval_names_missing_refinement_weights_before_any_work(tmp_path):
    missing = tmp_path / "nowhere" / "dino.safetensors"
    cfg = eval_config(
        "dataset=voc21",
        f"dataset.root={tmp_path / 'no-dataset-either'}",  # the weights are checked first
        "refine=lposs",
        f"refine.affinity.weights={missing}",
    )
    expected = rf"{re.escape(str(missing))}.*config key refine\.affinity\.weights"
    with pytest.raises(FileNotFoundError, match=expected):
        run_evaluation(cfg, tmp_path / "eval")


@pytest.mark.slow
def test_segment_script_with_lposs_and_anyup(tmp_path):
    image = write_scene_images(tmp_path / "images", count=1, size=(48, 64)) / "scene_00.jpg"
    result = run_script(
        "segment.py",
        f"image={image}",
        "classes=[sky,ground]",
        "templates=single",
        "bounds=null",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        *refine_overrides(tmp_path, "lposs", "anyup"),
    )
    assert (tmp_path / "run" / "scene_00_segmentation.png").is_file(), result.stdout


def test_speed_rows_time_every_stage_alone_and_together(tmp_path, tiny_backbone):
    config = _stage_config(tmp_path, "lposs_plus", "anyup")
    config["refine"]["affinity"]["weights"] = None  # random weights: timing only
    config["upsample"]["weights"] = None
    stages = stage_combinations(config["refine"], config["upsample"])
    assert list(stages) == ["bilinear", "lposs_plus", "anyup", "lposs_plus+anyup"]
    results = measure_stages(
        tiny_backbone,
        torch.device("cpu"),
        stages,
        sizes=[[32, 48]],
        num_classes=3,
        warmup=0,
        repeats=1,
        log=lambda message: None,
    )
    rows = results["fp32"]
    assert list(rows) == list(stages)
    for row in rows.values():
        assert row["32x48"]["seconds"] > 0 and row["32x48"]["peak_memory_bytes"] is None
    table = format_stage_table(results)
    assert "lposs_plus+anyup" in table and "32x48" in table


def test_stages_off_leave_the_segmenter_as_it_was(tiny_backbone):
    stages = build_stages({"refine": {"name": "none"}, "upsample": {"name": "bilinear"}})
    assert stages == {"refiner": None, "upsampler": None}
    classes = ["sky", "road"]
    plain = OpenVocabSegmenter.from_backbone(tiny_backbone, classes, templates="single")
    off = OpenVocabSegmenter.from_backbone(tiny_backbone, classes, templates="single", **stages)
    images = torch.randn(1, 3, 40, 56)
    assert torch.equal(off.name_logits(images), plain.name_logits(images))
