"""Evaluation resumes only from per-image scores of the same settings, data and weights: the
fingerprint on the first line of per_image.jsonl, records keyed by the image's path relative to
the dataset root, eval_results.json recording the fingerprint."""

import hashlib
import json

import numpy as np
import pytest
from helpers import ROOT, eval_config, write_benchmark
from PIL import Image

from spar import evaluation
from spar.models import create_backbone
from spar.models.checkpoint import save_checkpoint
from spar.output_names import OutputCollisionError
from spar.provenance import ProvenanceError, weights_digest


def _student(path, seed):
    """A tiny student whose last two blocks differ with ``seed``, saved to ``path``."""
    save_checkpoint(path, create_backbone("tiny", seed=seed, trainable_blocks="last-2"))
    return path


def test_resume_refuses_a_checkpoint_rewritten_at_the_same_path(tmp_path):
    root = tmp_path / "city"
    write_benchmark("cityscapes", root)
    checkpoint = _student(tmp_path / "best.safetensors", seed=1)
    cfg = eval_config("dataset=cityscapes", f"dataset.root={root}", f"checkpoint={checkpoint}")
    first = evaluation.run_evaluation(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    evaluated = create_backbone("tiny", checkpoint=checkpoint)  # built apart from the run
    assert written["fingerprint"]["weights"] == weights_digest(evaluated)
    assert first["num_images"] == 3

    _student(checkpoint, seed=2)  # training rewrote best.safetensors in place
    with pytest.raises(ProvenanceError) as error:
        evaluation.run_evaluation(cfg, tmp_path / "run")
    message = str(error.value)
    assert "per_image.jsonl" in message and "weights: " in message
    assert "checkpoint" not in message.split("differing:")[1]  # the path did not change
    assert "\n" not in message


def test_resume_with_the_same_fingerprint_ignores_speed_settings(tmp_path):
    root = tmp_path / "city"
    write_benchmark("cityscapes", root, count=4)
    base = ["dataset=cityscapes", f"dataset.root={root}"]
    complete = evaluation.run_evaluation(eval_config(*base), tmp_path / "run")
    again = evaluation.run_evaluation(
        eval_config(*base, "show_progress=true", "save_predictions=true"), tmp_path / "run"
    )
    assert (again["resumed_images"], again["num_images"]) == (4, 4)
    assert again["miou"] == complete["miou"]


def test_other_settings_or_data_stop_before_any_model_is_built(tmp_path, monkeypatch):
    root = tmp_path / "city"
    write_benchmark("cityscapes", root)
    base = ["dataset=cityscapes", f"dataset.root={root}"]
    evaluation.run_evaluation(eval_config(*base), tmp_path / "run")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(evaluation, "create_backbone", no_model)
    with pytest.raises(ProvenanceError, match=r"templates: single -> imagenet80"):
        evaluation.run_evaluation(eval_config(*base, templates="imagenet80"), tmp_path / "run")
    with pytest.raises(ProvenanceError, match=r"dataset\.logit_scale: 40(\.0)? -> 50(\.0)?"):
        evaluation.run_evaluation(eval_config(*base, "dataset.logit_scale=50"), tmp_path / "run")
    with pytest.raises(ProvenanceError, match=r"teacher\.stride: null -> 24"):
        evaluation.run_evaluation(
            eval_config(*base, "features=teacher", "teacher.window=64"), tmp_path / "run"
        )
    label = sorted((root / "gtFine").rglob("*.png"))[0]
    label.write_bytes(label.read_bytes() + b"\0")  # a label file changed
    with pytest.raises(ProvenanceError, match=r"data\.labels: 3 images, "):
        evaluation.run_evaluation(eval_config(*base), tmp_path / "run")


def test_a_per_image_file_without_a_fingerprint_is_refused(tmp_path):
    root = tmp_path / "city"
    write_benchmark("cityscapes", root)
    run = tmp_path / "run"
    run.mkdir()
    old = {"signature": {"dataset": {"name": "cityscapes"}}}
    (run / "per_image.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(ProvenanceError, match=r"per_image\.jsonl holds per-image scores without"):
        evaluation.run_evaluation(eval_config("dataset=cityscapes", f"dataset.root={root}"), run)


def _ade20k_with_one_stem_twice(root):
    """ADE20K with ``x.jpg`` in two sub-folders of the split, each with its own label."""
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        images, labels = (
            root / "images/validation" / folder,
            root / "annotations/validation" / folder,
        )
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / "x.jpg")
        label = rng.integers(1, 151, (48, 64)).astype(np.uint8)
        Image.fromarray(label, mode="L").save(labels / "x.png")


def test_one_stem_in_two_folders_is_two_images(tmp_path):
    root = tmp_path / "ade"
    _ade20k_with_one_stem_twice(root)
    cfg = eval_config("dataset=ade20k", f"dataset.root={root}")
    first = evaluation.run_evaluation(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / "per_image.jsonl").read_text().splitlines()
    keys = [json.loads(line)["image"] for line in lines[1:]]
    assert sorted(keys) == ["images/validation/a/x.jpg", "images/validation/b/x.jpg"]
    resumed = evaluation.run_evaluation(cfg, tmp_path / "run")
    assert (first["num_images"], resumed["num_images"], resumed["resumed_images"]) == (2, 2, 2)
    assert resumed["miou"] == first["miou"]
    # Predictions are named <name>.png: the two would collide, so they are refused up front.
    with pytest.raises(OutputCollisionError, match=r"a/x\.jpg and .*b/x\.jpg .*'x\.png'"):
        evaluation.run_evaluation(
            eval_config("dataset=ade20k", f"dataset.root={root}", "save_predictions=true"),
            tmp_path / "predictions",
        )


def test_an_image_listed_twice_is_refused_naming_it(tmp_path):
    root = tmp_path / "voc"
    write_benchmark("voc21", root)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + "2008_000000\n")
    with pytest.raises(OutputCollisionError, match=r"2008_000000\.jpg .*listed twice"):
        evaluation.run_evaluation(eval_config(f"dataset.root={root}"), tmp_path / "run")
    assert not (tmp_path / "run" / "per_image.jsonl").exists()


def test_the_fingerprint_holds_scored_settings_data_and_weights_only(tmp_path):
    root = tmp_path / "city"
    write_benchmark("cityscapes", root)
    cfg = eval_config("dataset=cityscapes", f"dataset.root={root}", "num_workers=0")
    evaluation.run_evaluation(cfg, tmp_path / "run")
    first = (tmp_path / "run" / "per_image.jsonl").read_text().splitlines()[0]
    fingerprint = json.loads(first)["fingerprint"]
    for key in ("num_workers", "show_progress", "device", "compile", "save_predictions"):
        assert key not in fingerprint
    for key in ("checkpoint", "dataset.root", "dataset.class_names", "backbone.pretrained"):
        assert key not in fingerprint  # their content is fingerprinted instead
    assert not any(key.startswith("teacher.") for key in fingerprint)  # features=student
    assert fingerprint["templates"] == "single" and fingerprint["dataset.logit_scale"] == 40
    assert fingerprint["autocast"] == "float32"  # precision=auto on the CPU
    assert fingerprint["data.images"].startswith("3 images, ")
    assert fingerprint["data.labels"].startswith("3 images, ")
    classes = (ROOT / "spar" / "assets" / "classes" / "cityscapes.txt").read_bytes()
    assert fingerprint["data.class_names"] == hashlib.blake2b(classes, digest_size=16).hexdigest()
    assert fingerprint["weights"] == weights_digest(create_backbone("tiny"))
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["fingerprint"] == fingerprint
