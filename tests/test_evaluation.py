"""Evaluation end to end on tiny datasets in every layout: the reported mIoU equals the one
recomputed from the saved prediction PNGs; protocol configs; eval.py with student and teacher
features; renamed settings named."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import CONFIGS, ROOT, eval_config, miou_from_pngs, run_script, write_benchmark
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spar import segmentation
from spar.config import RenamedSettingError
from spar.data.benchmarks import BENCHMARKS, SegmentationBenchmark
from spar.distributed import register_run_id_resolver
from spar.evaluation import (
    collect_results,
    evaluate_benchmark,
    prediction_to_png,
    read_prediction_png,
    run_evaluation,
)
from spar.segmentation import (
    PROMPT_TEMPLATES,
    OpenVocabSegmenter,
    build_text_classifier,
    load_class_names,
)

register_run_id_resolver()


@pytest.mark.slow  # the fast tier: run_evaluation with both sources, each layout's reader
def test_script_sweep_over_every_layout_and_both_feature_sources(tmp_path):
    """One eval.py sweep: every dataset layout, student and teacher; each reported mIoU equals the
    mIoU recomputed from its saved prediction PNGs."""
    for name in BENCHMARKS:
        write_benchmark(name, tmp_path / "data" / name)
    run_script(
        "eval.py",
        "--multirun",
        f"dataset={','.join(sorted(BENCHMARKS))}",
        "features=student,teacher",
        f"dataset.root={tmp_path / 'data'}/${{dataset.name}}",
        "dataset.bounds=[128,96]",
        "teacher.window=64",
        "templates=single",
        "save_predictions=true",
        "num_workers=0",
        "show_progress=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    for name in BENCHMARKS:
        for features in ("student", "teacher"):
            run = tmp_path / "sweep" / f"{name}-tiny-{features}"
            written = json.loads((run / "eval_results.json").read_text())
            summary = (written["dataset"], written["features"], written["num_images"])
            assert summary == (name, features, 3)
            assert len(written["per_class_iou"]) == BENCHMARKS[name].num_classes
            for key in ("miou", "aacc", "per_class_iou", "images_per_second", "config"):
                assert key in written
            recomputed, metric = miou_from_pngs(name, tmp_path / "data" / name, run / "predictions")
            assert written["miou"] == pytest.approx(recomputed, abs=1e-9), (name, features)
            assert written["aacc"] == pytest.approx(100 * metric.compute().aacc, abs=1e-9)


def test_run_evaluation_from_python_with_the_80_prompt_ensemble(tmp_path, monkeypatch):
    """The paper's protocol end to end (the other tests use one prompt per name): every class
    name goes through all 80 ImageNet templates."""
    encoded = []

    def counting_classifier(encode_text, classes, templates="imagenet80", **kwargs):
        def encode(prompts):
            encoded.extend(prompts)
            return encode_text(prompts)

        return build_text_classifier(encode, classes, templates, **kwargs)

    monkeypatch.setattr(segmentation, "build_text_classifier", counting_classifier)
    write_benchmark("cityscapes", tmp_path / "data")
    cfg = eval_config(
        "dataset=cityscapes", f"dataset.root={tmp_path / 'data'}", templates="imagenet80"
    )
    results = run_evaluation(cfg, tmp_path / "run")
    assert results["num_images"] == 3 and 0 <= results["miou"] <= 100
    names = [
        name
        for synonyms in load_class_names(BENCHMARKS["cityscapes"].class_file)
        for name in synonyms
    ]
    assert len(encoded) == 80 * len(names)
    assert {template(names[0]) for template in PROMPT_TEMPLATES} <= set(encoded)
    assert (tmp_path / "run" / "eval_results.json").is_file()
    assert not (tmp_path / "run" / "predictions").exists()


@pytest.mark.parametrize("name", ["voc21", "cityscapes"])
def test_teacher_features_use_the_sliding_window(tmp_path, name):
    write_benchmark(name, tmp_path / "data")
    common = [f"dataset={name}", f"dataset.root={tmp_path / 'data'}", "save_predictions=true"]
    slide = run_evaluation(
        eval_config(*common, "features=teacher", "teacher.window=64", "teacher.stride=24"),
        tmp_path / "slide",
    )
    run_evaluation(eval_config(*common), tmp_path / "single")
    recomputed, _ = miou_from_pngs(name, tmp_path / "data", tmp_path / "slide" / "predictions")
    assert slide["miou"] == pytest.approx(recomputed, abs=1e-9)
    slide_pngs = sorted((tmp_path / "slide" / "predictions").iterdir())
    single_pngs = sorted((tmp_path / "single" / "predictions").iterdir())
    assert any(
        not np.array_equal(read_prediction_png(a), read_prediction_png(b))
        for a, b in zip(slide_pngs, single_pngs, strict=True)
    )


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    write_benchmark("ade20k", tmp_path / "data")
    broken = sorted((tmp_path / "data" / "images" / "validation").iterdir())[1]
    broken.write_bytes(b"not a jpeg")
    cfg = eval_config("dataset=ade20k", f"dataset.root={tmp_path / 'data'}")
    with pytest.warns(UserWarning, match=broken.name):
        results = run_evaluation(cfg, tmp_path / "run")
    assert results["num_images"] == 2 and results["skipped_images"] == 1
    assert results["skipped_files"] == [str(broken)]


def test_protocol_settings_follow_the_paper():
    def dataset(name, backbone="tiny"):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("eval", [f"dataset={name}", f"backbone={backbone}"])
            return OmegaConf.to_container(cfg, resolve=True)["dataset"]

    context60, cityscapes = dataset("context60"), dataset("cityscapes")
    # VOC21's thresholds are the authors' for OpenCLIP only (naomikombol/SPAR
    # configs/maskclip/cfg_voc21.py; the siglip2 and dinov3txt configs set none).
    for backbone, thresholds in (
        ("maskclip", (0.1, 0.1)),
        ("tiny", (0.1, 0.1)),
        ("siglip2", (None, None)),
        ("dinov3txt", (None, None)),
    ):
        settings = dataset("voc21", backbone)
        assert settings["logit_scale"] == 65
        assert (settings["prob_threshold"], settings["area_threshold"]) == thresholds, backbone
    assert (context60["logit_scale"], context60["prob_threshold"]) == (50, 0.1)
    assert context60["area_threshold"] is None
    assert cityscapes["bounds"] == [2048, 1024]
    for name in ("voc20", "context59", "coco_object", "coco_stuff", "ade20k"):
        settings = dataset(name)
        assert settings["logit_scale"] == 40 and settings["bounds"] == [2048, 672]
        assert settings["prob_threshold"] is None and settings["area_threshold"] is None


def test_class_count_mismatch_is_an_error(tmp_path, tiny_backbone):
    write_benchmark("cityscapes", tmp_path)
    dataset = SegmentationBenchmark("cityscapes", tmp_path)
    segmenter = OpenVocabSegmenter.from_backbone(tiny_backbone, ["road", "sky"], templates="single")
    with pytest.raises(ValueError, match="2 class names for cityscapes"):
        evaluate_benchmark(segmenter, dataset, tiny_backbone.mean, tiny_backbone.std)


def test_prediction_png_round_trip(tmp_path):
    prediction = torch.randint(0, 171, (5, 7))
    prediction_to_png(prediction).save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_prediction_png(tmp_path / "p.png"), prediction.numpy())


# The teacher through eval.py is slow; the fast tier has it through run_evaluation.
@pytest.mark.parametrize("features", ["student", pytest.param("teacher", marks=pytest.mark.slow)])
def test_eval_script_prints_the_table_and_writes_results(tmp_path, features):
    write_benchmark("voc21", tmp_path / "voc")
    result = run_script(
        "eval.py",
        "dataset=voc21",
        f"dataset.root={tmp_path / 'voc'}",
        "dataset.bounds=[128,96]",
        f"features={features}",
        "teacher.window=64",
        "templates=single",
        "save_predictions=true",
        "num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "aeroplane" in result.stdout and "mIoU" in result.stdout
    written = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert written["features"] == features and written["config"]["dataset"]["logit_scale"] == 65
    assert f"weights {written['fingerprint']['weights'][:8]}" in result.stdout
    recomputed, _ = miou_from_pngs("voc21", tmp_path / "voc", tmp_path / "run" / "predictions")
    assert written["miou"] == pytest.approx(recomputed, abs=1e-9)


def test_collect_results_builds_the_baseline_versus_spar_table(tmp_path):
    def write(folder, dataset, features, miou, checkpoint=None, refine="none", upsample="bilinear"):
        config = {
            "backbone": {"name": "siglip2"},
            "checkpoint": checkpoint,
            "teacher": {"stride": 24},
            "refine": {"name": refine},
            "upsample": {"name": upsample},
        }
        payload = {"dataset": dataset, "features": features, "miou": miou, "config": config}
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "eval_results.json").write_text(json.dumps(payload))

    write("a", "voc20", "student", 71.3)
    write("b", "ade20k", "student", 16.8)
    write("c", "voc20", "teacher", 77.5)
    write("d", "voc20", "student", 81.5, checkpoint="/ckpt/spar_siglip2.ckpt")
    write("e", "ade20k", "student", 23.4, checkpoint="/ckpt/spar_siglip2.ckpt")
    write("f", "voc20", "student", 89.7, checkpoint="/ckpt/spar_siglip2.ckpt", refine="lposs")
    write("g", "voc20", "student", 86.2, "/ckpt/spar_siglip2.ckpt", "none", "anyup")
    table = collect_results(tmp_path).splitlines()
    assert table[0] == "| setting | ade20k | voc20 | mean |"
    assert "| siglip2 single pass | 16.8 | 71.3 | 44.0 |" in table
    assert "| siglip2 teacher (stride 24) |  | 77.5 |  |" in table
    assert "| siglip2 SPAR (spar_siglip2.ckpt) | 23.4 | 81.5 | 52.5 |" in table
    assert "| siglip2 SPAR (spar_siglip2.ckpt) + lposs |  | 89.7 |  |" in table
    assert "| siglip2 SPAR (spar_siglip2.ckpt) + anyup |  | 86.2 |  |" in table


@pytest.mark.slow  # torchrun, two processes; the fast tier: MeanIoU merges and sums shards
def test_two_process_evaluation_sums_the_shards(tmp_path):
    write_benchmark("cityscapes", tmp_path / "data", count=5)
    data = ["dataset=cityscapes", f"dataset.root={tmp_path / 'data'}"]
    single = run_evaluation(eval_config(*data), tmp_path / "one")
    result = run_script(
        "eval.py",
        *data,
        "dataset.bounds=[128,96]",
        "templates=single",
        "device=cpu",
        "num_workers=0",
        "show_progress=false",
        f"hydra.run.dir={tmp_path / 'two'}",
        ranks=2,
    )
    assert result.stdout.count("mIoU") == 1  # rank 0 prints
    sharded = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert sharded["num_images"] == 5
    assert sharded["miou"] == pytest.approx(single["miou"], abs=1e-9)
    assert sharded["per_class_iou"] == pytest.approx(single["per_class_iou"], abs=1e-9, nan_ok=True)


def test_renamed_settings_name_their_new_spelling(tmp_path):
    with pytest.raises(RenamedSettingError, match=r"mode is now features .*slide is now teacher"):
        run_evaluation({"mode": "slide", "slide": {"stride": 48}, "features": "student"}, tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval.py"), "mode=slide", "slide.stride=48"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "mode is now features (mode=single: features=student, mode=slide: features=teacher)" in (
        result.stderr
    )
    assert "slide is now teacher (e.g. teacher.stride=48" in result.stderr


def test_every_benchmark_config_extends_the_protocol():
    for name in BENCHMARKS:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=[f"dataset={name}"])
        assert cfg.dataset.name == name and cfg.dataset.class_names is None
        assert list(cfg.dataset.bounds) == ([2048, 1024] if name == "cityscapes" else [2048, 672])
        assert cfg.dataset.logit_scale == {"voc21": 65, "context60": 50}.get(name, 40)
