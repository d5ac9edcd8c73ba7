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

from spar.demo import SAMPLE_IMAGES
from spar.features import extract_features
from spar.models import SlidingWindowTeacher
from spar.segmentation import OpenVocabSegmenter
from spar.viz import feature_picture, segmentation_picture

CAT = SAMPLE_IMAGES / "cat.jpg"


def test_segmentation_picture_is_one_call(tiny_backbone):
    picture, mask = segmentation_picture(
        tiny_backbone, CAT, ["sky", "cat, kitten", "floor"], bounds=(160, 120)
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


def test_extract_features_script_writes_and_resumes(tmp_path):
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
    path = tmp_path / "features" / "sub" / "cat.safetensors"
    with safe_open(str(path), framework="pt") as file:
        features = file.get_tensor("features")
        info = json.loads(file.metadata()["info"])
    assert features.dtype == torch.float16 and features.shape == (64, 6, 8)
    assert info["input_size"] == [85, 128] and info["backbone"]["name"] == "tiny"
    second = run_script(
        "extract_features.py",
        *common,
        "features=teacher",
        "teacher.window=64",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    assert "0 written, 2 kept" in second.stdout


def test_extract_features_rejects_unknown_dtype(tmp_path, tiny_backbone):
    with pytest.raises(ValueError, match="dtype"):
        extract_features(
            tiny_backbone, [CAT], SAMPLE_IMAGES, tmp_path, mean=(0,) * 3, std=(1,) * 3, dtype="int8"
        )


@pytest.mark.parametrize(
    ("script", "overrides", "expected"),
    [
        ("segment.py", ["teacher=true", "slide.stride=48"], ["teacher=true is now show_teacher"]),
        ("extract_features.py", ["mode=slide"], ["mode is now features (mode=single: features"]),
    ],
)
def test_renamed_settings_are_named_with_their_new_spelling(script, overrides, expected):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    for text in expected:
        assert text in result.stderr
    with pytest.raises(TypeError, match="teacher= is now dense"):
        feature_picture(None, CAT, teacher=None)
