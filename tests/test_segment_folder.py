"""Folder-level segmentation: spar.segment_images.segment_path and ``spar-segment image=<dir>``."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, script_environment
from PIL import Image

from spar.imaging import fit_size, load_image, resize_to_fit, to_model_input
from spar.models import create_backbone
from spar.provenance import ProvenanceError
from spar.segment_images import OutputFolderError, segment_path
from spar.segmentation import OpenVocabSegmenter

CLASSES = ["sky", "road, street", "car"]
BOUNDS = (64, 48)
# Relative path -> (H, W) of the generated image. a/x.jpg and b/x.jpg share a name; x.jpg and
# x.png share a stem; sizes make two resized sizes (64x48-ish and 48x64-ish).
IMAGES = {
    "a/x.jpg": (40, 56),
    "b/x.jpg": (40, 56),
    "x.jpg": (56, 40),
    "x.png": (40, 56),
    "c/d/y.png": (30, 42),
}
CORRUPT = "b/broken.jpg"


def _write_images(root):
    rng = np.random.default_rng(7)
    for relative, (height, width) in IMAGES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    (root / CORRUPT).write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image either")
    return root


@pytest.fixture
def folder(tmp_path):
    return _write_images(tmp_path / "images")


def _segment(backbone, path, out_dir, **options):
    options = {"bounds": BOUNDS, "templates": "single", "show_progress": False, **options}
    expected = "broken.jpg" if path.is_dir() else None
    with pytest.warns(UserWarning, match=expected) if expected else contextlib.nullcontext():
        return segment_path(backbone, path, options.pop("classes", CLASSES), out_dir, **options)


def _expected_mask(backbone, image_path, segmenter=None):
    """The prediction for one image computed here, by hand: load, resize with the protocol's
    resize, normalise, one segmenter forward of a batch of one, scores resized back to the
    image's own size (as evaluation does)."""
    segmenter = segmenter or OpenVocabSegmenter.from_backbone(backbone, CLASSES, templates="single")
    original = load_image(image_path)
    pixels = resize_to_fit(original, BOUNDS)
    inputs = to_model_input(pixels, backbone.mean, backbone.std)
    return segmenter.predict(inputs, output_size=original.shape[-2:])[0].numpy()


def test_every_image_gets_three_outputs_named_by_its_relative_path(folder, tmp_path, tiny_backbone):
    out = tmp_path / "out"
    summary = _segment(tiny_backbone, folder, out, batch_size=2)
    assert (summary.written, summary.skipped, summary.unreadable) == (5, 0, 1)
    assert "broken.jpg" in summary.unreadable_files[0]
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(
        f"{relative}{suffix}"
        for relative in IMAGES
        for suffix in (".classes.png", ".overlay.png", ".json")
    )
    assert produced == sorted([*expected, "segmentation_fingerprint.json"])


def test_class_png_is_the_segmenters_prediction_and_shares_count_its_pixels(
    folder, tmp_path, tiny_backbone
):
    out = tmp_path / "out"
    _segment(tiny_backbone, folder, out, batch_size=4)
    segmenter = OpenVocabSegmenter.from_backbone(tiny_backbone, CLASSES, templates="single")
    for relative, (height, width) in IMAGES.items():
        with Image.open(out / f"{relative}.classes.png") as png:
            assert png.mode == "L"
            classes = np.asarray(png)
        assert classes.shape == (height, width)  # the image's own size
        info = json.loads((out / f"{relative}.json").read_text())
        # The forward pass's size (mmcv rule): scale = min(64/long, 48/short), sides rounded.
        scale = min(64 / max(height, width), 48 / min(height, width))
        assert info["resized_size"] == [int(height * scale + 0.5), int(width * scale + 0.5)]
        expected = _expected_mask(tiny_backbone, folder / relative, segmenter)
        np.testing.assert_array_equal(classes, expected)

        shares = info["shares"]
        assert list(shares) == ["sky", "road", "car"]
        assert sum(shares.values()) == pytest.approx(1.0)
        counts = np.bincount(classes.ravel(), minlength=3) / classes.size
        assert [shares[name] for name in ("sky", "road", "car")] == pytest.approx(counts)
        assert info["original_size"] == [height, width]
        assert info["seconds"]["total"] >= info["seconds"]["forward"] > 0

        with Image.open(out / f"{relative}.overlay.png") as picture:
            assert picture.mode == "RGB" and picture.height >= classes.shape[0]
            assert picture.width > classes.shape[1]  # the legend is appended on the right


def test_same_size_images_share_a_batch(folder, tmp_path, patch_average_backbone):
    # Three images of 40x56, one of 56x40, one of 30x42. y.png fits to the same 46x64 as the
    # 40x56 ones, but its scores go back to another size: batches are of one original size.
    # Batch size 8: one forward per original size.
    assert fit_size(30, 42, BOUNDS) == fit_size(40, 56, BOUNDS) == (46, 64)
    _segment(patch_average_backbone, folder, tmp_path / "out", batch_size=8)
    assert patch_average_backbone.calls == 3
    assert patch_average_backbone.largest_batch == 3  # a/x, b/x, x.png


def test_a_rerun_skips_the_images_done_and_redoes_missing_outputs(folder, tmp_path, tiny_backbone):
    out = tmp_path / "out"
    _segment(tiny_backbone, folder, out)
    (out / "x.png.overlay.png").unlink()  # as if killed between two writes of x.png
    before = (out / "a" / "x.jpg.classes.png").stat().st_mtime_ns
    summary = _segment(tiny_backbone, folder, out)
    assert (summary.written, summary.skipped, summary.unreadable) == (1, 4, 1)
    assert (out / "x.png.overlay.png").is_file()
    assert (out / "a" / "x.jpg.classes.png").stat().st_mtime_ns == before
    # An image rewritten since its outputs were made is segmented again.
    stat = (folder / "x.jpg").stat()
    os.utime(folder / "x.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    summary = _segment(tiny_backbone, folder, out)
    assert (summary.written, summary.skipped) == (1, 4)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"classes": ["sky", "road", "bus"]}, "classes"),
        ({"templates": "imagenet80"}, "templates"),
        ({"bounds": (96, 64)}, "bounds"),
        ({"settings": {"refine.name": "lposs"}}, "settings.refine.name"),
    ],
)
def test_a_rerun_with_other_settings_is_refused_naming_the_key(
    folder, tmp_path, tiny_backbone, change, key
):
    out = tmp_path / "out"
    _segment(tiny_backbone, folder, out)
    options = {"bounds": BOUNDS, "templates": "single", "show_progress": False, **change}
    with pytest.raises(ProvenanceError) as error:
        segment_path(tiny_backbone, folder, options.pop("classes", CLASSES), out, **options)
    message = str(error.value)
    assert f"{key}:" in message and str(out) in message and "\n" not in message


def test_a_rerun_with_other_weights_is_refused(folder, tmp_path, tiny_backbones):
    out = tmp_path / "out"
    _segment(tiny_backbones("tiny"), folder, out)
    other = create_backbone("tiny")
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ProvenanceError, match=r"weights\.backbone: "):
        segment_path(other, folder, CLASSES, out, bounds=BOUNDS, templates="single")


def test_one_image_file_is_segmented_by_the_same_call(folder, tmp_path, tiny_backbone):
    out = tmp_path / "one"
    summary = _segment(tiny_backbone, folder / "a" / "x.jpg", out)
    assert (summary.written, summary.skipped, summary.unreadable) == (1, 0, 0)
    with Image.open(out / "x.jpg.classes.png") as png:
        classes = np.asarray(png)
    np.testing.assert_array_equal(classes, _expected_mask(tiny_backbone, folder / "a" / "x.jpg"))


def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_backbone):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"no images .* under {empty}$"):
        segment_path(tiny_backbone, empty, CLASSES, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()

    images = _write_images(tmp_path / "images")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputFolderError, match=f"output folder {blocker / 'out'} cannot be"):
        segment_path(tiny_backbone, images, CLASSES, blocker / "out", show_progress=False)


@pytest.mark.slow  # a script start-up (Hydra, torch): several seconds
def test_segment_script_on_a_folder_writes_resumes_and_refuses_other_settings(folder, tmp_path):
    out = tmp_path / "seg"
    common = [
        f"image={folder}",
        "classes=[sky,'road, street',car]",
        "templates=single",
        "bounds=[64,48]",
        "device=cpu",
        f"output={out}",
        "batch_size=2",
    ]
    result = run_script("segment.py", *common, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "5 written, 0 skipped (done before), 1 unreadable" in result.stdout
    assert (out / "a" / "x.jpg.classes.png").is_file() and (out / "b" / "x.jpg.json").is_file()
    summary = json.loads((tmp_path / "run" / "segment_summary.json").read_text())
    assert (summary["images"], summary["written"]) == (6, 5)

    # A resume with other classes: one line from the command, no traceback.
    def failing(*overrides):
        command = [sys.executable, str(ROOT / "scripts" / "segment.py"), *overrides]
        run = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=script_environment(os.environ),
            cwd=tmp_path,
            timeout=300,
        )
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        return run.stderr.strip().splitlines()

    changed = [o if not o.startswith("classes=") else "classes=[sky,road,bus]" for o in common]
    lines = failing(*changed, f"hydra.run.dir={tmp_path / 'run2'}")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "classes:" in lines[0]


def test_an_output_folder_inside_the_image_folder_is_not_segmented_again(folder, tiny_backbone):
    out = folder / "segmented"
    first = _segment(tiny_backbone, folder, out)
    second = _segment(tiny_backbone, folder, out)
    assert (first.written, second.written, second.skipped) == (5, 0, 5)
    assert not list(out.rglob("*.classes.png.*"))  # no output of an output
