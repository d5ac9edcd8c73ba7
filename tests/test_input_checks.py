"""Bad input fails with a one-line error naming the file, key or value, before long work:
repeated class names, unusable class-name files, a class count that does not fit the dataset
(before any model is built), float images outside [0, 1]."""

import numpy as np
import pytest
import torch
from helpers import eval_config, write_benchmark
from PIL import Image

from spar import evaluation
from spar.config import SettingError, report_user_errors
from spar.evaluation import dataset_classes, run_evaluation
from spar.imaging import ImageValueError, image_tensor, load_image
from spar.segmentation import (
    ClassNameError,
    OpenVocabSegmenter,
    load_class_names,
    parse_classes,
)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_repeated_line_of_a_class_file_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("sky\ncar\n\ntree\ncar\n")  # "car" on lines 2 and 5 (line 3 is blank)
    with pytest.raises(ClassNameError) as error:
        load_class_names(path)
    assert _one_line(error).startswith(f"class-name file {path}: ")
    assert "'car' (line 2, line 5)" in str(error.value)
    assert isinstance(error.value, SettingError)  # scripts print it as "error: ..."


def test_a_name_repeated_across_synonyms_is_refused_ignoring_case():
    with pytest.raises(ClassNameError) as error:
        parse_classes(["sky", "car, automobile", ["Automobile"], "tree, Tree"])
    message = _one_line(error)
    assert message.startswith("classes: ")
    assert "'automobile' (class 1, class 2)" in message
    assert "'tree' (class 3, class 3)" in message


def test_many_repeats_are_summarised_on_one_line():
    names = [f"name{i % 100}" for i in range(10_000)]  # 100 names, each 100 times
    with pytest.raises(ClassNameError) as error:
        parse_classes(names)
    assert _one_line(error).endswith(
        "; give each name once (synonyms of one class go on one entry, comma-separated)"
    )
    assert "and 95 more" in str(error.value)
    assert len(str(error.value)) < 3000


def test_the_segmenter_refuses_repeated_names_before_encoding_any():
    def encode_text(prompts):
        raise AssertionError("no name may be encoded")

    with pytest.raises(ClassNameError, match=r"'sky' \(class 0, class 2\)"):
        OpenVocabSegmenter(lambda images: images, encode_text, ["sky", "road", " sky "])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "holds no class names"),
        (b"\n   \n\t\n", "holds no class names"),
        (b"sky\n\xff\xfecar\n", r"is not UTF-8 text \(byte 0xff at offset 4\)"),
        (b"sky\n , \n", r"class 1 \(' , '\) has no name"),
    ],
    ids=["empty", "blank", "latin1", "commas"],
)
def test_unusable_class_files_give_a_one_line_user_error(tmp_path, content, expected):
    path = tmp_path / "classes.txt"
    path.write_bytes(content)
    with pytest.raises(ClassNameError, match=expected) as error:
        load_class_names(path)
    assert _one_line(error).startswith(f"class-name file {path}")

    @report_user_errors
    def script():
        load_class_names(path)

    with pytest.raises(SystemExit) as exit_info:  # what scripts/*.py print: no traceback
        script()
    assert str(exit_info.value).startswith(f"error: class-name file {path}")


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("sky\nperson, pedestrian\n".encode("utf-8-sig"))
    assert load_class_names(path) == [["sky"], ["person", "pedestrian"]]


def test_the_class_count_is_checked_before_any_model_is_built(tmp_path, monkeypatch):
    """10,000 names for ADE20K's 150 classes: refused up front (it took 44 s of backbone
    building and text encoding before)."""

    def no_backbone(*args, **kwargs):
        raise AssertionError("no model may be built")

    monkeypatch.setattr(evaluation, "create_backbone", no_backbone)
    write_benchmark("ade20k", tmp_path / "data")
    path = tmp_path / "names.txt"
    path.write_text("".join(f"name {i}\n" for i in range(10_000)))
    cfg = eval_config(
        "dataset=ade20k", f"dataset.root={tmp_path / 'data'}", f"dataset.class_names={path}"
    )
    with pytest.raises(SettingError) as error:
        run_evaluation(cfg, tmp_path / "run")
    assert _one_line(error) == (
        f"dataset.class_names: {path} holds 10000 classes, but ade20k has 150 (one class per "
        "line, synonyms comma-separated on it)"
    )
    assert not (tmp_path / "run" / "per_image.jsonl").exists()
    missing_root = cfg.copy()
    missing_root.dataset.root = str(tmp_path / "nowhere")  # checked before the dataset's folders
    with pytest.raises(SettingError, match="holds 10000 classes, but ade20k has 150"):
        run_evaluation(missing_root, tmp_path / "run")


def test_dataset_settings_of_the_class_names_are_checked():
    with pytest.raises(SettingError, match=r"dataset.name must be one of \[.*'voc21'\], got 'voc'"):
        dataset_classes({"name": "voc", "class_names": None})
    with pytest.raises(SettingError, match=r"dataset.class_names must be the path .*\['sky'\]"):
        dataset_classes({"name": "voc21", "class_names": ["sky"]})
    expected = {"voc21": 21, "context60": 60, "coco_stuff": 171, "ade20k": 150, "cityscapes": 19}
    for name, count in expected.items():  # the shipped files fit, without repeats
        assert len(dataset_classes({"name": name, "class_names": None})) == count


def _float_tiff(path, values) -> None:
    Image.fromarray(np.array(values, dtype=np.float32), mode="F").save(path)


def test_a_float_tiff_with_values_up_to_255_is_refused_naming_file_and_range(tmp_path):
    path = tmp_path / "scan.tif"
    _float_tiff(path, [[0.0, 12.5], [255.0, 128.0]])
    with pytest.raises(ImageValueError) as error:
        load_image(path)
    assert _one_line(error) == (
        f"float image {path} has values in [0, 255], outside [0, 1]: divide it by 255 or save "
        "it as 8-bit"
    )


def test_float_images_out_of_range_or_not_finite_are_refused(tmp_path):
    path = tmp_path / "hdr.tif"
    _float_tiff(path, [[-0.5, 300.0]])
    with pytest.raises(ImageValueError, match=r"hdr.tif has values in \[-0.5, 300\].*scale it"):
        load_image(path)
    _float_tiff(path, [[0.5, float("nan")]])
    with pytest.raises(ImageValueError, match=r"hdr.tif holds 1 NaN or infinite values"):
        load_image(path)
    in_memory = Image.fromarray(np.array([[2.0]], dtype=np.float32), mode="F")
    with pytest.raises(ImageValueError, match=r"given as a PIL.Image has values in \[2, 2\]"):
        image_tensor(in_memory)


def test_a_float_tiff_in_0_1_loads_as_it_is(tmp_path):
    path = tmp_path / "unit.tif"
    _float_tiff(path, [[0.0, 0.25], [1.0, 0.5]])
    expected = torch.tensor([[0.0, 0.25], [1.0, 0.5]]).expand(3, 2, 2)
    torch.testing.assert_close(load_image(path), expected, rtol=0, atol=0)
