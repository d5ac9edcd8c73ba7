"""Every script as users run it, on the tier's device (``SPAR_TEST_DEVICE``, default ``cuda``):
train (cached and online teacher, plain and under torchrun), cache_teacher, eval (student and
teacher features), segment (with and without the teacher), extract_features, demo and speed.
Each test checks what the script wrote, not only its exit code."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_script, write_benchmark
from PIL import Image
from safetensors import safe_open

from spar.data import SAMPLE_IMAGES, load_image, resize_to_fit
from spar.evaluation import read_prediction_png
from spar.models import create_backbone

pytestmark = pytest.mark.gpu

PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
HELDOUT_SIZES = ("160x128", "256x192")


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def assert_finite_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, checked finite; returns them."""
    with safe_open(str(path), "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    assert tensors, f"{path} holds no tensor"
    for key, tensor in tensors.items():
        assert torch.isfinite(tensor.float()).all(), f"{path}: {key} is not finite"
    return tensors


def check_training_run(run: Path, device_name: str, precision: str, cache: bool) -> dict:
    """A finished training run in ``run``: summary, finite agreement numbers, checkpoints that
    load through ``create_backbone``. Returns the summary."""
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["run"]["device"] == device_name and summary["run"]["teacher"]["cache"] is cache
    assert ("cache" in summary) is cache
    assert summary["precision"] == PRECISION_NAMES[precision]
    assert summary["world_size"] == 1 and summary["epochs_completed"] == 1
    assert summary["steps"] == summary["train_views"] == 2 and summary["skipped_images"] == 0
    for key in ("heldout_mse_before", "heldout_mse_after", "heldout_cos_before"):
        assert finite(summary[key]), (key, summary[key])
    assert finite(summary["heldout_cos_after"]) and finite(summary["best_heldout_mse"])
    assert set(summary["heldout_sizes"]) == set(HELDOUT_SIZES)
    for row in summary["heldout_sizes"].values():
        assert all(finite(row[k]) for k in ("mse_before", "mse_after", "cos_before", "cos_after"))
    checkpoints = run / "checkpoints"
    assert summary["checkpoint"] == str(checkpoints / "last.safetensors")
    for name in ("last.safetensors", "best.safetensors", "last.state.pt"):
        assert (checkpoints / name).is_file(), name
    assert_finite_tensors(checkpoints / "last.safetensors")
    loaded = create_backbone("tiny", checkpoint=str(checkpoints / "last.safetensors"))
    assert loaded.identity["name"] == "tiny"
    return summary


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "online"])
def test_train_script(tmp_path, small_training, device_name, precision, cache):
    run = tmp_path / "run"
    result = run_script(
        "train.py",
        *small_training,
        f"teacher.cache={str(cache).lower()}",
        f"trainer.precision={precision}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert "held-out 160x128" in result.stdout and "held-out 256x192" in result.stdout
    summary = check_training_run(run, device_name, precision, cache)
    if cache:
        assert summary["cache"] == {"computed": 2, "reused": 0, "skipped": 0}


def test_train_script_under_torchrun(tmp_path, small_training, device_name, precision):
    """``torchrun --nproc_per_node 1 scripts/train.py ...``: the launcher's environment
    (RANK, LOCAL_RANK, ...) on the device."""
    run = tmp_path / "run"
    result = run_script(
        "train.py",
        *small_training,
        f"trainer.precision={precision}",
        f"hydra.run.dir={run}",
        torchrun=True,
        cwd=tmp_path,
    )
    assert result.stdout.count("held-out 160x128") == 1
    check_training_run(run, device_name, precision, cache=True)


def test_cache_teacher_script_then_training_reuses_it(
    tmp_path, small_training, precision, tiny_backbone
):
    common = [*small_training, f"trainer.precision={precision}"]
    filled = run_script("cache_teacher.py", *common, f"hydra.run.dir={tmp_path / 'fill'}")
    assert "2 computed, 0 reused" in filled.stdout
    stats = json.loads((tmp_path / "fill" / "cache_summary.json").read_text())
    assert (stats["computed"], stats["reused"], stats["skipped"]) == (2, 0, 0)
    assert stats["cache_dir"].startswith(str(tmp_path / "cache"))
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) >= 2
    for entry in entries:
        maps = assert_finite_tensors(entry)
        assert all(m.ndim == 3 and m.shape[0] == tiny_backbone.embed_dim for m in maps.values())
    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'train'}", cwd=tmp_path)
    summary = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    assert summary["cache"] == {"computed": 0, "reused": 2, "skipped": 0}
    assert finite(summary["heldout_mse_after"])


@pytest.mark.parametrize("features", ["student", "teacher"])
def test_eval_script(tmp_path, device_name, precision, features, distilled_checkpoint):
    labels = write_benchmark("voc21", tmp_path / "voc", count=2)
    checkpoint = distilled_checkpoint if features == "student" else "null"
    result = run_script(
        "eval.py",
        "dataset=voc21",
        f"dataset.root={tmp_path / 'voc'}",
        "dataset.bounds=[128,96]",
        f"features={features}",
        "teacher.window=64",
        "templates=single",
        f"checkpoint={checkpoint}",
        f"precision={precision}",
        f"device={device_name}",
        "save_predictions=true",
        "num_workers=0",
        "show_progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "mIoU" in result.stdout
    written = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    summary = (written["features"], written["num_images"], written["skipped_images"])
    assert summary == (features, 2, 0)
    assert written["config"]["device"] == device_name
    assert written["config"]["precision"] == precision
    assert 0 <= written["miou"] <= 100 and 0 <= written["aacc"] <= 100
    assert finite(written["images_per_second"]) and len(written["per_class_iou"]) == 21
    for stem, label in labels.items():
        prediction = read_prediction_png(tmp_path / "run" / "predictions" / f"{stem}.png")
        assert prediction.shape == label.shape
        assert prediction.min() >= 0 and prediction.max() < 21


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "with-teacher"])
def test_segment_script(tmp_path, device_name, teacher):
    image = SAMPLE_IMAGES / "rocket.jpg"
    result = run_script(
        "segment.py",
        f"image={image}",
        "classes=[sky,'person, astronaut',rocket,'smoke, cloud']",
        "bounds=[160,128]",
        f"show_teacher={str(teacher).lower()}",
        f"compile={str(not teacher).lower()}",  # the student alone runs compiled (inductor)
        "teacher.window=96",
        "teacher.stride=32",
        "templates=single",
        f"device={device_name}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "wrote" in result.stdout
    assert ("compile=True:" in result.stdout) == (not teacher)
    height, width = resize_to_fit(load_image(image), (160, 128)).shape[-2:]
    columns = 2 if teacher else 1
    with Image.open(tmp_path / "run" / "rocket_segmentation.png") as picture:
        assert picture.width >= columns * width and picture.height >= height
    with Image.open(tmp_path / "run" / "rocket_features.png") as picture:
        assert picture.width >= (columns + 1) * width and picture.height >= height
        assert np.asarray(picture.convert("RGB")).std() > 0


@pytest.mark.parametrize("features", ["student", "teacher"])
def test_extract_features_script(tmp_path, scene_images, device_name, features, tiny_backbone):
    out = tmp_path / "features"
    result = run_script(
        "extract_features.py",
        f"images={scene_images}",
        f"output={out}",
        f"features={features}",
        f"compile={str(features == 'student').lower()}",
        "teacher.window=96",
        "bounds=[160,128]",
        f"device={device_name}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "3 written, 0 kept, 0 skipped" in result.stdout
    summary = json.loads((tmp_path / "run" / "features_summary.json").read_text())
    assert (summary["written"], summary["kept"], summary["skipped"]) == (3, 0, 0)
    assert (summary["compile"] is not None) == (features == "student")
    files = sorted(out.glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(p.name for p in scene_images.glob("*.jpg"))
    for path in files:
        stored = assert_finite_tensors(path)["features"]
        with safe_open(str(path), "pt") as file:
            info = json.loads(file.metadata()["info"])
        assert info["features"] == features and stored.dtype == torch.float16
        rows, cols = (math.ceil(side / tiny_backbone.patch_size) for side in info["input_size"])
        assert tuple(stored.shape) == (tiny_backbone.embed_dim, rows, cols)


def test_demo_script(tmp_path, device_name, distilled_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("rocket.jpg", "cat.jpg"):
        shutil.copy(SAMPLE_IMAGES / name, images / name)
    result = run_script(
        "demo.py",
        f"images={images}",
        f"checkpoint={distilled_checkpoint}",
        "teacher.window=96",
        "teacher.stride=48",
        "bounds=[160,128]",
        f"device={device_name}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "mean cosine to the teacher" in result.stdout and "distilled" in result.stdout
    summary = json.loads((tmp_path / "run" / "demo_summary.json").read_text())
    assert len(summary["images"]) == 2
    for key in ("mean_mse", "mean_cosine", "mean_distilled_cosine", "teacher_over_student_time"):
        assert finite(summary[key]), (key, summary[key])
    for row in summary["images"]:
        assert row["windows"] > 1 and -1 <= row["cosine"] <= 1 + 1e-6
    for stem in ("rocket", "cat"):
        assert (tmp_path / "run" / f"{stem}_features.png").stat().st_size > 0
        assert (tmp_path / "run" / f"{stem}_segmentation.png").stat().st_size > 0


def test_speed_script(tmp_path, device_name, device):
    precisions = ["fp32", "bf16"]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ["fp32"]
    result = run_script(
        "speed.py",
        f"device={device_name}",
        "sizes=[[224,224],[224,448]]",
        "stride_sweep=[224,112]",
        f"precisions=[{','.join(precisions)}]",
        "batch_sizes=[1,2]",
        "train_batch_sizes=[1,2]",
        "warmup=1",
        "repeats=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert "measured matmul peak" in result.stdout
    results = json.loads((tmp_path / "speed_results.json").read_text())
    assert results["device"]["device"].split(":")[0] == device.type
    assert list(results["precisions"]) == precisions
    for precision, section in results["precisions"].items():
        assert finite(section["matmul_peak_tflops"]) and section["matmul_peak_tflops"] > 0
        training = section["training"]
        training_size = "x".join(map(str, training["size"]))
        for size, row in section["sizes"].items():
            student = row["student"]
            assert finite(student["latency_s"]) and student["latency_s"] > 0, (precision, size)
            assert student["best_batch"] in (1, 2) and student["best_images_per_second"] > 0
            # the training stride (teacher.stride, 24) is also timed at the training size
            expected = [224, 112] + ([training["stride"]] if size == training_size else [])
            assert [t["stride"] for t in row["teacher"]] == expected
            assert all(finite(t["seconds"]) and t["windows"] >= 1 for t in row["teacher"])
            if device.type == "cuda":
                assert student["peak_memory_bytes"] > 0
        assert set(training["cached_images_per_second"]) == {"1", "2"}
        assert training["online_images_per_second"] > 0
        if precision != "fp32":
            accuracy = section["accuracy"]
            assert finite(accuracy["student_relative_error"])
            assert accuracy["student_relative_error"] < 0.1
    assert (tmp_path / "speed_strides.png").stat().st_size > 1000
