"""Semantic-segmentation benchmarks, read from the layouts mmsegmentation's preparation scripts
produce, with the label conventions of the open-vocabulary evaluation protocol.

Every dataset yields ``(image, label)`` pairs: the image as a (3, H, W) float tensor in [0, 1]
and the label as an (H, W) int64 map with values in [0, K) or ``IGNORE_INDEX`` (255). Label
conversions: ``reduce_zero`` maps 0 to 255 and v to v - 1 (ADE20K, VOC20, Context59), the others
keep the file's values.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import image_size, load_image

IGNORE_INDEX = 255
LABEL_MODES = ("P", "L", "I", "I;16")  # single-channel modes a label PNG may have
CLASS_FILES = Path(__file__).resolve().parents[1] / "assets" / "classes"


class DatasetLayoutError(FileNotFoundError):
    """A dataset root lacks a folder or list file that its layout needs."""


class LabelError(ValueError):
    """A label map does not fit its image or holds values outside the dataset's classes."""


@dataclass(frozen=True)
class Sample:
    """One evaluation pair: the image file, its label file, and a name for outputs."""

    image: Path
    label: Path
    name: str


def _require(path: Path, dataset: str, layout: str) -> Path:
    if not path.exists():
        raise DatasetLayoutError(
            f"{dataset}: {path} not found; expected layout under the root: {layout}"
        )
    return path


def _list_file_samples(
    root: Path, dataset: str, layout: str, images: str, labels: str, split_file: str
) -> list[Sample]:
    """VOC-style: ids in a split file, ``images/<id>.jpg`` and ``labels/<id>.png``."""
    image_dir = _require(root / images, dataset, layout)
    label_dir = _require(root / labels, dataset, layout)
    split = _require(root / split_file, dataset, layout)
    ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetLayoutError(f"{dataset}: split file {split} lists no images")
    return [Sample(image_dir / f"{i}.jpg", label_dir / f"{i}.png", i) for i in ids]


def _paired_samples(
    root: Path,
    dataset: str,
    layout: str,
    images: str,
    labels: str,
    image_suffix: str,
    label_suffix: str,
) -> list[Sample]:
    """Folder-style: every ``<stem><image_suffix>`` under ``images`` (recursive) with the label
    ``<stem><label_suffix>`` at the same relative place under ``labels``."""
    image_dir = _require(root / images, dataset, layout)
    label_dir = _require(root / labels, dataset, layout)
    samples = []
    for image in sorted(image_dir.rglob(f"*{image_suffix}")):
        stem = image.name[: -len(image_suffix)]
        relative = image.parent.relative_to(image_dir)
        samples.append(Sample(image, label_dir / relative / f"{stem}{label_suffix}", stem))
    if not samples:
        raise DatasetLayoutError(f"{dataset}: no *{image_suffix} images under {image_dir}")
    return samples


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark.

    Attributes:
        name: the benchmark's name (also the class-name file's stem).
        num_classes: K.
        layout: the expected folders under the root, quoted in errors.
        find_samples: ``(root, split) -> samples``.
        reduce_zero: label 0 is ignored and the others shift down by one.
        default_split: the evaluation split.
    """

    name: str
    num_classes: int
    layout: str
    find_samples: Callable[[Path, str], list[Sample]]
    reduce_zero: bool = False
    default_split: str = "val"

    @property
    def class_file(self) -> Path:
        return CLASS_FILES / f"{self.name}.txt"


def _pascal(
    name: str, num_classes: int, reduce_zero: bool, kind: str, release: str
) -> BenchmarkSpec:
    """VOC (``kind`` = "") or Pascal-Context (``kind`` = "Context") in a VOCdevkit release."""
    labels, lists = f"SegmentationClass{kind}", f"ImageSets/Segmentation{kind}"
    layout = f"JPEGImages/, {labels}/, {lists}/<split>.txt ({release})"

    def find(root: Path, split: str) -> list[Sample]:
        return _list_file_samples(root, name, layout, "JPEGImages", labels, f"{lists}/{split}.txt")

    return BenchmarkSpec(name, num_classes, layout, find, reduce_zero)


def _coco(name: str, num_classes: int, label_suffix: str) -> BenchmarkSpec:
    layout = f"images/<split>2017/*.jpg, annotations/<split>2017/*{label_suffix} (coco_stuff164k)"

    def find(root: Path, split: str) -> list[Sample]:
        return _paired_samples(
            root,
            name,
            layout,
            f"images/{split}2017",
            f"annotations/{split}2017",
            ".jpg",
            label_suffix,
        )

    return BenchmarkSpec(name, num_classes, layout, find)


def _cityscapes() -> BenchmarkSpec:
    layout = (
        "leftImg8bit/<split>/<city>/*_leftImg8bit.png, "
        "gtFine/<split>/<city>/*_gtFine_labelTrainIds.png"
    )

    def find(root: Path, split: str) -> list[Sample]:
        return _paired_samples(
            root,
            "cityscapes",
            layout,
            f"leftImg8bit/{split}",
            f"gtFine/{split}",
            "_leftImg8bit.png",
            "_gtFine_labelTrainIds.png",
        )

    return BenchmarkSpec("cityscapes", 19, layout, find)


def _ade20k() -> BenchmarkSpec:
    layout = "images/<split>/*.jpg, annotations/<split>/*.png (ADEChallengeData2016)"

    def find(root: Path, split: str) -> list[Sample]:
        return _paired_samples(
            root, "ade20k", layout, f"images/{split}", f"annotations/{split}", ".jpg", ".png"
        )

    return BenchmarkSpec("ade20k", 150, layout, find, reduce_zero=True, default_split="validation")


#: The eight evaluation benchmarks of the paper's protocol, by name (``dataset.name``).
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        _pascal("voc21", 21, reduce_zero=False, kind="", release="VOC2012"),
        _pascal("voc20", 20, reduce_zero=True, kind="", release="VOC2012"),
        _pascal("context60", 60, reduce_zero=False, kind="Context", release="VOC2010"),
        _pascal("context59", 59, reduce_zero=True, kind="Context", release="VOC2010"),
        _coco("coco_object", 81, "_instanceTrainIds.png"),
        _coco("coco_stuff", 171, "_labelTrainIds.png"),
        _cityscapes(),
        _ade20k(),
    )
}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The :data:`BENCHMARKS` entry ``name``; ``KeyError`` listing the known names otherwise."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def convert_label(raw: np.ndarray, spec: BenchmarkSpec, source: Path | str) -> torch.Tensor:
    """(H, W) integer label file values -> (H, W) int64 labels in [0, K) or 255.

    Raises ``LabelError`` naming ``source`` for values outside the dataset's classes.
    """
    label = torch.from_numpy(raw.astype(np.int64))
    if spec.reduce_zero:
        label = torch.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= spec.num_classes))
    if bad.any():
        values = sorted(set(torch.unique(label[bad]).tolist()))[:10]
        raise LabelError(
            f"{source}: label values {values} outside the {spec.num_classes} classes of "
            f"{spec.name} (after conversion; {IGNORE_INDEX} = ignore)"
        )
    return label


def load_label(path: Path, spec: BenchmarkSpec) -> torch.Tensor:
    """Read a label PNG (palette or grey values = class ids) and convert it."""
    if not path.is_file():
        raise DatasetLayoutError(f"{spec.name}: label file {path} not found")
    with Image.open(path) as image:
        if image.mode not in LABEL_MODES:
            raise LabelError(f"{path}: label maps must be single-channel, got mode {image.mode}")
        raw = np.asarray(image)
    return convert_label(raw, spec, path)


class SegmentationBenchmark(Dataset):
    """A benchmark split: items are dicts with ``name``, ``image``, ``label``, ``skipped``.

    An image that cannot be decoded gives ``skipped`` = the reason (and no image or label), so
    an evaluation can report and count it; a label whose size differs from its image raises
    ``LabelError``.

    Args:
        name: one of ``BENCHMARKS``.
        root: the dataset root (e.g. ``data/VOCdevkit/VOC2012``, ``data/ADEChallengeData2016``).
        split: defaults to the evaluation split (``val``; ADE20K ``validation``).
    """

    def __init__(self, name: str, root: str | Path, split: str | None = None) -> None:
        self.spec = benchmark_spec(name)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetLayoutError(
                f"{name}: dataset root {self.root} not found; pass dataset.root=<folder> (in "
                f"Python: root=); expected layout: {self.spec.layout}"
            )
        self.split = split or self.spec.default_split
        self.samples = self.spec.find_samples(self.root, self.split)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        item = {"name": sample.name, "image_path": str(sample.image), "skipped": None}
        try:
            image = load_image(sample.image)
        except (ValueError, FileNotFoundError) as error:
            item["skipped"] = str(error)
            return item
        label = load_label(sample.label, self.spec)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise LabelError(
                f"{sample.label}: label size {tuple(label.shape)} differs from its image "
                f"{sample.image} {tuple(image.shape[-2:])}"
            )
        item["image"], item["label"] = image, label
        return item


def check_split(dataset: SegmentationBenchmark, sampled: int = 16, seed: int = 0) -> list[str]:
    """Check a split's layout up front, cheaply: every label file exists, is single-channel and
    has its image's size (file headers only), and the values of ``sampled`` label maps (seeded
    choice; all when the split is smaller) lie in the dataset's classes.

    Returns the images whose header cannot be read (they are skipped and counted by the
    evaluation, like undecodable images). Raises :class:`LabelError` (or
    :class:`DatasetLayoutError` for missing label files) listing the first problems and their
    count, before any model runs.
    """
    problems, missing, unreadable = [], [], []
    for sample in dataset.samples:
        if not sample.label.is_file():
            missing.append(str(sample.label))
            continue
        try:
            size = image_size(sample.image)
        except (ValueError, OSError) as error:
            unreadable.append(f"{sample.image}: {error}")
            continue
        try:
            with Image.open(sample.label) as label:
                mode, (width, height) = label.mode, label.size
        except OSError as error:
            problems.append(f"{sample.label}: unreadable ({error})")
            continue
        if mode not in LABEL_MODES:
            problems.append(f"{sample.label}: label maps must be single-channel, got mode {mode}")
        elif (height, width) != size:
            problems.append(
                f"{sample.label}: label size {(height, width)} differs from its image "
                f"{sample.image} {size}"
            )
    if missing:
        raise DatasetLayoutError(_listing(f"{dataset.spec.name}: label files not found", missing))
    chosen = random.Random(seed).sample(dataset.samples, min(sampled, len(dataset.samples)))
    for sample in chosen:
        try:
            load_label(sample.label, dataset.spec)
        except LabelError as error:
            if str(error) not in problems:
                problems.append(str(error))
    if problems:
        raise LabelError(_listing(f"{dataset.spec.name} ({dataset.root})", problems))
    return unreadable


def _listing(title: str, problems: list[str], shown: int = 10) -> str:
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{title}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:shown]) + more
