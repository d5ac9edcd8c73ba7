"""Single-image use: one-call pictures from spar.viz, segment.py, extract_features.py, and the
alignment of logits with the image when the backbone pads it."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_script
from PIL import Image
from safetensors import safe_open

from spar.config import reject_renamed_overrides
from spar.data import SAMPLE_IMAGES, list_images
from spar.features import extract_features
from spar.models import SlidingWindowTeacher
from spar.provenance import ProvenanceError
from spar.segmentation import OpenVocabSegmenter
from spar.viz import feature_picture, segmentation_picture

CAT = SAMPLE_IMAGES / "cat.jpg"


def test_segmentation_picture_is_one_call(tiny_backbone):
    picture, mask = segmentation_picture(
        tiny_backbone, CAT, ["sky", "cat, kitten", "floor"], bounds=(160, 120), templates="single"
    )
    assert mask.shape == (106, 160) and int(mask.max()) < 3
    assert picture.height >= 106 and picture.width > 160  # image plus legend


def test_feature_picture_with_teacher(tiny_backbone):
    image = torch.rand(3, 70, 90)
    teacher = SlidingWindowTeacher(tiny_backbone, window=64, stride=24)
    picture = feature_picture(tiny_backbone, image, dense=teacher, bounds=None)
    assert picture.width >= 3 * 90 and picture.height >= 70


def test_logits_are_cropped_to_the_image_not_the_padding(patch_average_backbone):
    # 40 px wide: the grid has 3 cells of 16 px, the last one half padding.
    image = torch.zeros(1, 3, 16, 40)
    image[..., 32:] = 1.0  # only the last 8 real pixels are bright
    segmenter = OpenVocabSegmenter(
        patch_average_backbone,
        lambda texts: torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])[: len(texts)],
        ["bright", "dark"],
        templates=[lambda name: name],
    )
    padded_grid = patch_average_backbone(image)
    assert padded_grid.shape[-1] == 3
    logits = segmenter.name_logits(image)
    expected = torch.nn.functional.interpolate(
        40 * torch.nn.functional.normalize(padded_grid, dim=1).mul(3**-0.5).sum(1, keepdim=True),
        size=(16, 48),
        mode="bilinear",
        align_corners=False,
    )[..., :40]
    torch.testing.assert_close(logits[:, :1], expected)


def test_segment_script_writes_both_pictures(tmp_path):
    result = run_script(
        "segment.py",
        f"image={CAT}",
        "classes=[sky,'cat, kitten',floor]",
        "bounds=[160,120]",
        "show_teacher=true",
        "teacher.window=64",
        "templates=single",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert "cat_segmentation.png" in result.stdout
    segmentation = Image.open(tmp_path / "cat_segmentation.png")
    features = Image.open(tmp_path / "cat_features.png")
    assert segmentation.width > 2 * 160 and features.width >= 3 * 160


def test_extract_features_script_writes_and_resumes(tmp_path, tiny_backbone):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("cat.jpg", "rocket.jpg"):
        (images / "sub" / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    (images / "broken.png").write_bytes(b"nope")
    common = [f"images={images}", f"output={tmp_path / 'features'}", "bounds=[128,96]"]
    first = run_script(
        "extract_features.py", *common, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path
    )
    assert "2 written, 0 kept, 1 skipped" in first.stdout
    path = tmp_path / "features" / "sub" / "cat.jpg.safetensors"
    assert (
        json.loads((tmp_path / "features" / "fingerprint.json").read_text())["fingerprint"][
            "features"
        ]
        == "student"
    )
    with safe_open(str(path), framework="pt") as file:
        features = file.get_tensor("features")
        info = json.loads(file.metadata()["info"])
    assert features.dtype == torch.float16 and features.shape == (64, 6, 8)
    assert info["input_size"] == [85, 128] and info["backbone"]["name"] == "tiny"

    # Resuming (in process: a second script run costs seconds of start-up) with another source
    # is refused, naming what differs; overwrite=True writes the teacher's features instead.
    teacher = SlidingWindowTeacher(tiny_backbone, window=64, stride=24)
    options = {"mean": tiny_backbone.mean, "std": tiny_backbone.std, "bounds": (128, 96)}
    resume = [teacher, list_images(images), images, tmp_path / "features"]
    refused = r"features: student -> null.*stride: null -> \[24, 24\].*weights: "
    with pytest.raises(ProvenanceError, match=refused):
        extract_features(*resume, **options, show_progress=False)
    with pytest.warns(UserWarning, match="broken.png"):
        counts = extract_features(*resume, **options, overwrite=True, show_progress=False)
    assert (counts["written"], counts["kept"]) == (2, 0)
    with safe_open(str(path), framework="pt") as file:
        stitched = file.get_tensor("features")
    assert stitched.shape == features.shape and not torch.equal(stitched, features)


def test_extract_features_rejects_unknown_dtype(tmp_path, tiny_backbone):
    with pytest.raises(ValueError, match="dtype"):
        extract_features(
            tiny_backbone, [CAT], SAMPLE_IMAGES, tmp_path, mean=(0,) * 3, std=(1,) * 3, dtype="int8"
        )


RENAMED = [
    ("segment.py", ["teacher=true", "slide.stride=48"], ["teacher=true is now show_teacher"]),
    ("extract_features.py", ["mode=slide"], ["mode is now features (mode=single: features"]),
]


@pytest.mark.parametrize(("script", "overrides", "expected"), RENAMED)
def test_renamed_settings_are_named_with_their_new_spelling(script, overrides, expected):
    with pytest.raises(SystemExit) as exit_info:
        reject_renamed_overrides(overrides, script.removesuffix(".py"))
    for text in expected:
        assert text in str(exit_info.value)


def test_feature_picture_names_its_renamed_argument():
    with pytest.raises(TypeError, match="teacher= is now dense"):
        feature_picture(None, CAT, teacher=None)


@pytest.mark.slow  # the script start-up; the fast tier has the table above and eval.py's run
@pytest.mark.parametrize(("script", "overrides", "expected"), RENAMED)
def test_scripts_reject_renamed_settings_before_hydra(script, overrides, expected):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    for text in expected:
        assert text in result.stderr
