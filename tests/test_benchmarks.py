"""Benchmark readers: every layout, label conventions, and errors that name what is wrong."""

import numpy as np
import pytest
import torch
from helpers import write_benchmark
from PIL import Image

from spar.data.benchmarks import (
    BENCHMARKS,
    IGNORE_INDEX,
    DatasetLayoutError,
    LabelError,
    SegmentationBenchmark,
    convert_label,
)
from spar.segmentation import load_class_names

REDUCE_ZERO = {"voc20", "context59", "ade20k"}


def expected_labels(name, raw):
    label = raw.astype(np.int64)
    if name in REDUCE_ZERO:
        label = np.where((label == 0) | (label == 255), 255, label - 1)
    return label


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_layout_reads_images_and_converts_labels(tmp_path, name):
    raw = write_benchmark(name, tmp_path / name)
    dataset = SegmentationBenchmark(name, tmp_path / name)
    assert len(dataset) == 3
    for item in dataset:
        assert item["skipped"] is None
        assert item["image"].shape == (3, 48, 64) and item["image"].dtype == torch.float32
        np.testing.assert_array_equal(
            item["label"].numpy(), expected_labels(name, raw[item["name"]])
        )
        valid = item["label"][item["label"] != IGNORE_INDEX]
        assert valid.min() >= 0 and valid.max() < dataset.num_classes


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_packaged_class_names_match_the_class_count(name):
    spec = BENCHMARKS[name]
    classes = load_class_names(spec.class_file)
    assert len(classes) == spec.num_classes
    firsts = [synonyms[0] for synonyms in classes]
    assert len(set(firsts)) == len(firsts)


def test_voc21_background_is_queried_through_stuff_names():
    # The authors' list (naomikombol/SPAR configs/siglip2/cls_voc21.txt, also in the paper):
    # no name "background" itself.
    background = load_class_names(BENCHMARKS["voc21"].class_file)[0]
    assert background == (
        "sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, "
        "cloud, lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, "
        "fence"
    ).split(", ")


@pytest.mark.parametrize(
    ("name", "digest"),
    [
        ("voc21", "80e643a9a1439668"),
        ("voc20", "c68f65a2b342397c"),
        ("context60", "e29ff1a0eaea71eb"),
        ("context59", "cd808465f06a1616"),
        ("ade20k", "e53ded02c488bdb9"),
        ("cityscapes", "6f6782fc1bf92bfd"),
    ],
)
def test_class_names_are_the_authors_files(name, digest):
    """The names queried are the paper's: the SPAR authors' class files (naomikombol/SPAR
    0f63ff2 configs/siglip2/cls_<name>.txt, the same for all three backbones), trailing spaces
    and blank lines removed. The digests were recorded once from those files: a renamed class
    ("pottedplant", "chestofdrawers" are theirs) or an added synonym moves the paper's numbers.
    """
    import hashlib

    data = BENCHMARKS[name].class_file.read_bytes()
    assert hashlib.sha256(data).hexdigest()[:16] == digest
    tv = {"voc21": 20, "voc20": 19}
    if name in tv:
        names = load_class_names(BENCHMARKS[name].class_file)[tv[name]]
        assert names == ["television monitor", "tv monitor", "monitor", "television", "screen"]


def test_missing_folder_names_it_and_the_layout(tmp_path):
    write_benchmark("ade20k", tmp_path)
    (tmp_path / "annotations" / "validation").rename(tmp_path / "annotations" / "val")
    with pytest.raises(DatasetLayoutError, match=r"annotations/validation.*expected layout"):
        SegmentationBenchmark("ade20k", tmp_path)
    with pytest.raises(DatasetLayoutError, match="nowhere"):
        SegmentationBenchmark("voc21", tmp_path / "nowhere")


def test_missing_split_list_is_named(tmp_path):
    write_benchmark("context60", tmp_path)
    (tmp_path / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="SegmentationContext/val.txt"):
        SegmentationBenchmark("context60", tmp_path)


def test_missing_label_file_is_named(tmp_path):
    write_benchmark("coco_stuff", tmp_path)
    label = next((tmp_path / "annotations" / "val2017").iterdir())
    label.unlink()
    dataset = SegmentationBenchmark("coco_stuff", tmp_path)
    with pytest.raises(DatasetLayoutError, match=label.name):
        [dataset[i] for i in range(len(dataset))]


def test_label_of_another_size_is_an_error(tmp_path):
    write_benchmark("cityscapes", tmp_path)
    dataset = SegmentationBenchmark("cityscapes", tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(dataset.samples[0].label)
    with pytest.raises(LabelError, match=r"\(10, 10\) differs"):
        dataset[0]


def test_unknown_label_values_are_named(tmp_path):
    write_benchmark("cityscapes", tmp_path)
    dataset = SegmentationBenchmark("cityscapes", tmp_path)
    Image.fromarray(np.full((48, 64), 19, np.uint8)).save(dataset.samples[1].label)
    with pytest.raises(LabelError, match=r"\[19\].*cityscapes"):
        dataset[1]


def test_undecodable_image_is_reported_as_skipped(tmp_path):
    write_benchmark("voc21", tmp_path)
    dataset = SegmentationBenchmark("voc21", tmp_path)
    dataset.samples[2].image.write_bytes(b"garbage")
    item = dataset[2]
    assert item["skipped"] and dataset.samples[2].image.name in item["skipped"]


def test_convert_label_reduce_zero():
    spec = BENCHMARKS["ade20k"]
    raw = np.array([[0, 1, 150, 255]])
    assert convert_label(raw, spec, "x").tolist() == [[255, 0, 149, 255]]
