"""Outputs that cannot collide and reuse proven from the same weights and settings:
extract_features folders (names, fingerprint.json) and collect_results rows."""

import json

import numpy as np
import pytest
from PIL import Image

from spar import features as features_module
from spar.evaluation import collect_results
from spar.features import extract_features
from spar.models import create_backbone
from spar.output_names import OutputCollisionError
from spar.provenance import ProvenanceError


def _images(root):
    """``a/x.jpg``, ``a/x.png`` and ``b/x.jpg``: one stem three times."""
    rng = np.random.default_rng(0)
    paths = []
    for relative in ("a/x.jpg", "a/x.png", "b/x.jpg"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _extract(dense, paths, root, out, **options):
    options = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "bounds": (64, 48), **options}
    return extract_features(dense, paths, root, out, show_progress=False, **options)


def test_every_image_gets_its_own_file_named_by_its_whole_relative_path(tmp_path, tiny_backbone):
    root, out = tmp_path / "images", tmp_path / "features"
    paths = _images(root)
    counts = _extract(tiny_backbone, paths, root, out)
    assert (counts["written"], counts["kept"]) == (3, 0)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert written == ["a/x.jpg.safetensors", "a/x.png.safetensors", "b/x.jpg.safetensors"]
    assert (out / "fingerprint.json").is_file()
    counts = _extract(tiny_backbone, paths, root, out)
    assert (counts["written"], counts["kept"]) == (0, 3)


def test_two_inputs_for_one_output_are_refused_before_any_work(tmp_path, tiny_backbone):
    root, out = tmp_path / "images", tmp_path / "features"
    paths = _images(root)
    with pytest.raises(OutputCollisionError, match=r"a/x\.jpg and .*a/x\.jpg .*listed twice"):
        _extract(tiny_backbone, [*paths, paths[0]], root, out)
    assert not out.exists()


def test_resuming_with_other_weights_is_refused_and_overwrite_replaces(tmp_path, tiny_backbone):
    root, out = tmp_path / "images", tmp_path / "features"
    paths = _images(root)
    _extract(tiny_backbone, paths, root, out)
    other = create_backbone("tiny", seed=5)
    with pytest.raises(ProvenanceError, match=r"features was made from .*weights: "):
        _extract(other, paths, root, out)
    with pytest.raises(ProvenanceError, match=r"dtype: float16 -> float32"):
        _extract(tiny_backbone, paths, root, out, dtype="float32")
    counts = _extract(other, paths, root, out, overwrite=True)
    assert (counts["written"], counts["kept"]) == (3, 0)
    counts = _extract(other, paths, root, out)  # the folder is now the other model's
    assert (counts["written"], counts["kept"]) == (0, 3)


def test_the_fingerprint_is_written_before_the_first_feature(tmp_path, tiny_backbone, monkeypatch):
    root, out = tmp_path / "images", tmp_path / "features"
    paths = _images(root)

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(features_module, "prepare_images", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _extract(tiny_backbone, paths, root, out)
    recorded = json.loads((out / "fingerprint.json").read_text())["fingerprint"]
    assert recorded["dtype"] == "float16" and recorded["bounds"] == [64, 48]
    assert recorded["data.images"].startswith("3 images, ")
    assert not list(out.rglob("*.safetensors"))


def test_a_folder_of_features_without_a_fingerprint_is_refused(tmp_path, tiny_backbone):
    root, out = tmp_path / "images", tmp_path / "features"
    paths = _images(root)
    (out / "a").mkdir(parents=True)
    (out / "a" / "x.safetensors").write_bytes(b"old")  # an older spar's name and folder
    with pytest.raises(ProvenanceError, match=r"holds feature files .* but no fingerprint\.json"):
        _extract(tiny_backbone, paths, root, out)
    with pytest.raises(ProvenanceError, match=r"not in this run \(.*a/x\.safetensors, 1 in all"):
        _extract(tiny_backbone, paths, root, out, overwrite=True)


# -- collect_results --------------------------------------------------------------------------


def _result(root, folder, dataset, miou, checkpoint=None, **fingerprint):
    config = {
        "backbone": {"name": "siglip2"},
        "checkpoint": checkpoint,
        "features": "student",
        "refine": {"name": "none"},
        "upsample": {"name": "bilinear"},
    }
    full = {
        "backbone.name": "siglip2",
        "features": "student",
        "templates": "imagenet80",
        "dataset.name": dataset,
        "data.images": "3 images, 00",
        **fingerprint,
    }
    payload = {"dataset": dataset, "features": "student", "miou": miou, "config": config}
    (root / folder).mkdir(parents=True)
    (root / folder / "eval_results.json").write_text(json.dumps({**payload, "fingerprint": full}))


def test_two_students_named_best_safetensors_are_two_rows(tmp_path):
    _result(tmp_path, "a", "voc20", 70.0, "/runs/a/best.safetensors", weights="aaaa1111bbbb")
    _result(tmp_path, "b", "voc20", 60.0, "/runs/b/best.safetensors", weights="cccc2222dddd")
    _result(tmp_path, "c", "ade20k", 20.0, "/runs/b/best.safetensors", weights="cccc2222dddd")
    table = collect_results(tmp_path).splitlines()
    assert table[0] == "| setting | ade20k | voc20 | mean |"
    assert "| siglip2 SPAR (best.safetensors) [weights aaaa1111] |  | 70.0 |  |" in table
    assert "| siglip2 SPAR (best.safetensors) [weights cccc2222] | 20.0 | 60.0 | 40.0 |" in table
    assert len(table) == 4


def test_templates_split_rows_and_name_themselves(tmp_path):
    _result(tmp_path, "a", "voc20", 70.0, weights="w1")
    _result(tmp_path, "b", "voc20", 65.0, weights="w1", templates="single")
    table = collect_results(tmp_path).splitlines()
    assert "| siglip2 single pass [templates=imagenet80] | 70.0 | 70.0 |" in table
    assert "| siglip2 single pass [templates=single] | 65.0 | 65.0 |" in table


def test_one_row_and_dataset_from_two_fingerprints_is_never_merged(tmp_path):
    _result(tmp_path, "a", "voc20", 70.0, weights="w1")
    _result(tmp_path, "b", "voc20", 71.0, weights="w1", **{"data.images": "4 images, 11"})
    with pytest.raises(ProvenanceError, match=r"a/eval_results\.json and .*b/eval_results\.json"):
        collect_results(tmp_path)
    (tmp_path / "b" / "eval_results.json").unlink()
    _result(tmp_path, "c", "voc20", 70.0, weights="w1")  # the same evaluation, copied: one cell
    assert len(collect_results(tmp_path).splitlines()) == 3


def test_spar_collect_ends_with_one_error_line_naming_both_files(tmp_path, capsys):
    from spar.collect import main

    _result(tmp_path, "a", "voc20", 70.0, weights="w1")
    _result(tmp_path, "b", "voc20", 70.0, weights="w1", **{"dataset.logit_scale": 50})
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "a/eval_results.json and " in message and "dataset.logit_scale: null -> 50" in message
