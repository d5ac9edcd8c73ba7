"""The page's logic without a browser (and without Gradio): class text, segmentation, timings."""

import pytest
import torch
from PIL import Image

from spar.models import build_teacher, create_backbone, save_pretrained
from spar.segmentation import OpenVocabSegmenter
from spar.tools.app import classes_from_text, legend_html, load_backbone, run_page, segment_page


def test_classes_from_text_lines_semicolons_and_synonyms():
    text = "sky\n person , pedestrian \n\ncar; tree,plant"
    assert classes_from_text(text) == [
        ["sky"],
        ["person", "pedestrian"],
        ["car"],
        ["tree", "plant"],
    ]
    with pytest.raises(ValueError, match="empty"):
        classes_from_text(" \n ; ")


def test_segment_page_student_teacher_and_timings(tiny_backbone):
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    classes = ["sky", "person, astronaut", "tree"]

    result = segment_page(
        tiny_backbone,
        tiny_backbone,
        image,
        classes,
        teacher_stride=48,
        templates="single",
        bounds=None,
    )

    # The overlay is the library's: image plus legend, same mask as the segmenter's own.
    mask = OpenVocabSegmenter.from_backbone(tiny_backbone, classes, templates="single").predict(
        tiny_backbone.normalize(image)
    )[0]
    shares = [share for _, _, share in result.legend]
    assert [name for name, _, _ in result.legend] == ["sky", "person", "tree"]
    assert shares == pytest.approx([(mask == k).float().mean().item() for k in range(3)])
    assert result.student.height == 96 and result.student.width > 128
    windows = build_teacher(tiny_backbone, {"stride": 48}).num_windows(96, 128)
    assert result.teacher is not None and result.windows == windows
    assert set(result.seconds) == {"text", "student", "teacher", "features"}
    assert all(seconds > 0 for seconds in result.seconds.values())
    assert result.features.width == 3 * 128 + 2 * 8  # image, student, teacher side by side
    assert "sky" in legend_html(result.legend) and "person" in legend_html(result.legend)


def test_segment_page_without_teacher(tiny_backbone):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = segment_page(
        tiny_backbone, tiny_backbone, image, ["a", "b"], teacher_stride=None, bounds=None
    )
    assert result.teacher is None and "teacher" not in result.seconds
    assert result.features.width == 2 * 64 + 8


def test_run_page_with_a_saved_student_folder(tmp_path):
    student = create_backbone("tiny")
    with torch.no_grad():
        student.blocks[-1].mlp.c_fc.weight.mul_(-1)  # any change a distillation could make
    folder = save_pretrained(student, tmp_path / "student")
    sample = tmp_path / "image.png"
    Image.new("RGB", (80, 64), (30, 120, 200)).save(sample)
    args = ("sky\ngrass", "tiny")
    common = dict(
        show_teacher=False,
        teacher_stride=24,
        templates="single",
        bounds="448x336",
        prob_threshold=0.0,
        area_threshold=0.0,
        device="cpu",
    )
    _, teacher, features, legend, timings = run_page(str(sample), *args, str(folder), **common)
    assert teacher is None and "student (single pass)" in timings and "grass" in legend
    assert load_backbone("tiny", str(folder), "cpu") is not load_backbone("tiny", "", "cpu")
    with pytest.raises(ValueError, match="upload an image"):
        run_page(None, *args, "", **common)
