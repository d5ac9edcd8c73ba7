"""Golden tests of the evaluation protocol: ``run_evaluation`` (what ``scripts/eval.py`` calls),
with the real configs (``configs/eval.yaml``, ``configs/dataset/*.yaml``), on tiny benchmarks in
their on-disk layouts, with a deterministic fake backbone whose features are known.

The expected mIoU is computed here, in plain numpy, from the protocol as the paper's code runs
it (mmseg ``Resize(keep_ratio=True)`` = mmcv ``imrescale``; the SPAR authors' segmentor,
naomikombol/SPAR ``segmentors/segmentor_vit.py``): the size by mmcv's rule (hand-computed
literals), a bilinear resize without antialiasing rounded to 8-bit levels, the fake features,
cosine with one-hot text embeddings, the logit scale, bilinear (``align_corners=False``)
upsampling to the label's size, softmax, the area and probability rules, argmax, a confusion
matrix summed over the split, IoU of the classes present in labels or predictions, their mean.
The protocol constants are literals here, never read from spar.

The images are built so that the protocol's details matter: dark regions are classified by a
weak feature (background under the probability threshold, a class without it); isolated
bright 2x2 blocks are seen as bright by a nearest-neighbour resize but mixed with their dark
surroundings by the bilinear one; ADE20K's dark region carries label 0 (ignored); Cityscapes'
image is scaled by 32 under its own bounds (2048, 1024), by 21 under the default ones.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from spar.distributed import register_run_id_resolver
from spar.evaluation import run_evaluation

# The protocol, as literals (configs/dataset/*.yaml; the SPAR authors' configs): number of
# classes, logit scale, probability and area thresholds (VOC21: the MaskCLIP/tiny values),
# whether raw label 0 is ignored (and the others shift down by one), and the image size the
# test's source image is resized to, by hand from mmcv's rescale_size:
#   24x32 in (2048, 672): scale min(2048/32, 672/24) = 28 -> (672, 896)
#   32x64 in (2048, 1024): scale min(2048/64, 1024/32) = 32 -> (1024, 2048)
PROTOCOL = {
    "voc21": {"classes": 21, "scale": 65.0, "prob": 0.1, "area": 0.1, "reduce_zero": False},
    "context60": {"classes": 60, "scale": 50.0, "prob": 0.1, "area": None, "reduce_zero": False},
    "ade20k": {"classes": 150, "scale": 40.0, "prob": None, "area": None, "reduce_zero": True},
    "cityscapes": {"classes": 19, "scale": 40.0, "prob": None, "area": None, "reduce_zero": False},
}
SOURCE = {"voc21": (24, 32), "context60": (24, 32), "ade20k": (24, 32), "cityscapes": (32, 64)}
RESIZED = {"voc21": (672, 896), "context60": (672, 896), "ade20k": (672, 896)}
RESIZED["cityscapes"] = (1024, 2048)
# Each patch of the fake backbone covers a 2x2 block of source pixels after the resize.
PATCH = {"voc21": 56, "context60": 56, "ade20k": 56, "cityscapes": 64}
# The classes of the dark, dim, mid-grey and bright regions (after label conversion).
REGION_CLASSES = {
    "voc21": (3, 6, 8, 15),
    "context60": (12, 20, 30, 45),
    "ade20k": (5, 60, 40, 120),
    "cityscapes": (2, 6, 10, 13),
}

# Grey levels of the regions, and the fake backbone's buckets of a patch's mean grey level:
# [lowest, highest] level of the buckets dark, dim, mid, bright (the levels between: "none").
DARK, DIM, MID, BRIGHT, SPOT = 10, 60, 140, 250, 245
BUCKETS = ((0, 35), (45, 80), (95, 205), (225, 255))
# Lean of the dark and dim features toward their class (the rest points nowhere). Dark: below
# the 0.1 threshold. Dim: above it at the dataset's logit scale, below it at the default 40
# (VOC21: 65 * 0.016 -> p = e^1.04 / (20 + e^1.04) = 0.124, 40 * 0.016 -> 0.087;
# Context60: 50 * 0.042 -> e^2.1 / (59 + e^2.1) = 0.122, 40 * 0.042 -> 0.083).
DARK_LEAN = 0.006
DIM_LEAN = {"voc21": 0.016, "context60": 0.042, "ade20k": 0.016, "cityscapes": 0.016}


def bucket_features(name: str) -> np.ndarray:
    """(5, K + 1) features of the buckets none, dark, dim, mid, bright of benchmark ``name``;
    axis K is a direction that no class name has."""
    num_classes = PROTOCOL[name]["classes"]
    dark, dim, mid, bright = REGION_CLASSES[name]
    table = np.zeros((5, num_classes + 1))
    table[:3, num_classes] = 1.0  # none: orthogonal to every class; dark, dim: nearly
    table[1, dark] = DARK_LEAN
    table[2, dim] = DIM_LEAN[name]
    table[3, mid] = 1.0
    table[4, bright], table[4, num_classes] = 1.0, 0.6
    return table


def bucket_of(means: np.ndarray) -> np.ndarray:
    """Patch mean grey levels -> bucket indices (0 none, 1 dark, 2 dim, 3 mid, 4 bright)."""
    buckets = np.zeros(means.shape, dtype=np.int64)
    for index, (low, high) in enumerate(BUCKETS):
        buckets[(means >= low) & (means <= high)] = index + 1
    return buckets


class GoldenBackbone(nn.Module):
    """A dense backbone with known features: each patch's mean grey level (in 8-bit levels)
    picks one of four fixed feature vectors (:func:`bucket_features`); the text embedding of
    ``"... class<i>."`` is the one-hot vector of axis i."""

    def __init__(self, name: str):
        super().__init__()
        self.patch_size = PATCH[name]
        self.embed_dim = PROTOCOL[name]["classes"] + 1
        self.native_size = (4 * self.patch_size, 4 * self.patch_size)
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        table = torch.tensor(bucket_features(name), dtype=torch.float32)
        self.register_buffer("table", table)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K + 1, ceil(H / p), ceil(W / p))."""
        pad_h, pad_w = -images.shape[2] % self.patch_size, -images.shape[3] % self.patch_size
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        means = F.avg_pool2d(images.mean(dim=1, keepdim=True) * 255, self.patch_size)[:, 0]
        buckets = torch.zeros_like(means, dtype=torch.long)
        for index, (low, high) in enumerate(BUCKETS):
            buckets[(means >= low) & (means <= high)] = index + 1
        return self.table[buckets].permute(0, 3, 1, 2)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        index = [int(re.search(r"class(\d+)", text).group(1)) for text in texts]
        return F.one_hot(torch.tensor(index), self.embed_dim).float()


# ---- the scene: a grey source image and its true classes -------------------------------------


def scene(name: str, variant: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) grey levels and (H, W) class map (-1: the dark region, labelled per dataset) of
    one test image. Regions are aligned to the 2x2 blocks one patch sees.

    Image 0: a dark region with two bright spots, a bright region, a small dim region (VOC21's
    area rule drops its class); image 1: the dark region with its spots and a large dim one.
    """
    height, width = SOURCE[name]
    dark, dim, mid, bright = REGION_CLASSES[name]
    grey = np.full((height, width), MID, dtype=np.int64)
    classes = np.full((height, width), mid, dtype=np.int64)
    grey[:12, :16], classes[:12, :16] = DARK, -1
    if variant == 0:
        grey[14:, 20:], classes[14:, 20:] = BRIGHT, bright
        grey[14:22, 4:12], classes[14:22, 4:12] = DIM, dim
    else:
        grey[16:, :16], classes[16:, :16] = DIM, dim
    for top, left in ((2, 2), (6, 10)):  # bright spots inside the dark region
        grey[top : top + 2, left : left + 2] = SPOT
        classes[top : top + 2, left : left + 2] = bright
    return grey, classes


def raw_label(name: str, classes: np.ndarray) -> np.ndarray:
    """The label file's values for a class map: the dark region is background (0) in VOC21 and
    Context60, label 0 (ignored) in ADE20K, class ``dark`` in Cityscapes; ADE20K stores class
    c as c + 1; Cityscapes gets a row of 255 (ignored)."""
    raw = classes.copy()
    if name in ("voc21", "context60"):
        raw[classes == -1] = 0
    elif name == "ade20k":
        raw = np.where(classes == -1, 0, classes + 1)
    else:
        raw[classes == -1] = REGION_CLASSES[name][0]
        raw[-1, :] = 255
    return raw


def write_split(name: str, root, count: int) -> list[str]:
    """``count`` scenes of benchmark ``name`` in its layout under ``root``; returns the image
    paths (VOC, Context and ADE20K images are JPEGs, as the benchmarks ship them)."""
    paths = []
    for variant in range(count):
        grey, classes = scene(name, variant)
        pixels = Image.fromarray(np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))
        label = Image.fromarray(raw_label(name, classes).astype(np.uint8), mode="L")
        if name in ("voc21", "context60"):
            stem = f"2008_{variant:06d}"
            kind = "" if name == "voc21" else "Context"
            image_path = root / "JPEGImages" / f"{stem}.jpg"
            label_path = root / f"SegmentationClass{kind}" / f"{stem}.png"
            split = root / "ImageSets" / f"Segmentation{kind}" / "val.txt"
            split.parent.mkdir(parents=True, exist_ok=True)
            with split.open("a") as file:
                file.write(stem + "\n")
        elif name == "ade20k":
            stem = f"ADE_val_{variant:08d}"
            image_path = root / "images" / "validation" / f"{stem}.jpg"
            label_path = root / "annotations" / "validation" / f"{stem}.png"
        else:
            stem = f"frankfurt_000000_{variant:06d}"
            image_path = root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png"
            label_path = root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        pixels.save(image_path, **({"quality": 95} if image_path.suffix == ".jpg" else {}))
        label.save(label_path)
        paths.append((image_path, label_path))
    return paths


# ---- the expected score, in numpy -------------------------------------------------------------


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of a bilinear resize with half-pixel centres (no
    antialiasing), samples outside the first/last pixel centre clamped to it."""
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        where = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        first = min(int(np.floor(where)), size_in - 1)
        second = min(first + 1, size_in - 1)
        matrix[out, first] += 1 - (where - first)
        matrix[out, second] += where - first
    return matrix


def resize_bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) -> (..., h, w) by :func:`bilinear_matrix` along both axes."""
    rows = bilinear_matrix(values.shape[-2], size[0])
    cols = bilinear_matrix(values.shape[-1], size[1])
    return rows @ values @ cols.T


def expected_prediction(name: str, image_path, label_shape) -> np.ndarray:
    """The protocol's (H, W) prediction for one image, from the fake backbone's definition."""
    protocol = PROTOCOL[name]
    num_classes = protocol["classes"]
    pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float64)
    resized = np.stack([resize_bilinear(pixels[..., c], RESIZED[name]) for c in range(3)])
    resized = np.clip(np.floor(resized + 0.5), 0, 255)  # 8-bit levels (cv2 within 1 level)
    grey = resized.mean(axis=0)
    patch = PATCH[name]
    rows, cols = grey.shape[0] // patch, grey.shape[1] // patch
    means = grey.reshape(rows, patch, cols, patch).mean(axis=(1, 3))
    edges = np.array(BUCKETS).ravel()
    assert np.abs(means[..., None] - edges).min() > 3, "a patch mean is too close to an edge"
    buckets = bucket_of(means)
    assert (buckets > 0).all(), "the scene should have no patch of the 'none' bucket"
    features = bucket_features(name)[buckets]  # (h, w, K + 1)
    cosine = features[..., :num_classes] / np.linalg.norm(features, axis=-1, keepdims=True)
    logits = protocol["scale"] * cosine.transpose(2, 0, 1)  # (K, h, w)
    logits = resize_bilinear(logits, label_shape)
    probabilities = np.exp(logits - logits.max(axis=0))
    probabilities /= probabilities.sum(axis=0)
    if protocol["area"] is not None:  # the authors' rule: small foreground classes drop out
        winners = probabilities.argmax(axis=0)
        counts = np.bincount(winners.ravel(), minlength=num_classes)[1:]
        small = counts <= protocol["area"] * counts.sum()
        probabilities[1:][small] = 0
    prediction = probabilities.argmax(axis=0)
    confidence = probabilities.max(axis=0)
    decided = np.ones(confidence.shape, dtype=bool)  # pixels the argmax decides
    if protocol["prob"] is not None:
        assert np.abs(confidence - protocol["prob"]).min() > 1e-4, "too close to the threshold"
        decided = confidence >= protocol["prob"]
        prediction[~decided] = 0
    ordered = np.sort(probabilities, axis=0)
    assert (ordered[-1] - ordered[-2])[decided].min() > 1e-4, "a pixel is too close to a tie"
    return prediction


def label_classes(name: str, label_path) -> np.ndarray:
    """Label file -> class indices, 255 ignored (ADE20K: 0 ignored, c + 1 -> c)."""
    raw = np.asarray(Image.open(label_path), dtype=np.int64)
    if PROTOCOL[name]["reduce_zero"]:
        return np.where((raw == 0) | (raw == 255), 255, raw - 1)
    return raw


def expected_miou(name: str, paths) -> float:
    """mIoU in percent of the split: one confusion matrix over all images, the classes whose
    union is empty left out of the mean."""
    num_classes = PROTOCOL[name]["classes"]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image_path, label_path in paths:
        label = label_classes(name, label_path)
        prediction = expected_prediction(name, image_path, label.shape)
        counted = label != 255
        np.add.at(confusion, (label[counted], prediction[counted]), 1)
    hits = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
    return 100 * float(np.mean(hits[union > 0] / union[union > 0]))


# ---- the evaluation as scripts/eval.py runs it -----------------------------------------------


def evaluate(name: str, root, class_file, out_dir, monkeypatch, *overrides: str) -> dict:
    """``run_evaluation`` of ``configs/eval.yaml`` with ``dataset=name`` and the fake backbone
    (in place of the default ``tiny`` one, whose name selects VOC21's thresholds)."""
    fake = GoldenBackbone(name)
    monkeypatch.setattr("spar.evaluation.create_backbone", lambda **_: fake)
    register_run_id_resolver()
    settings = [
        f"dataset={name}",
        f"dataset.root={root}",
        f"dataset.class_names={class_file}",
        "device=cpu",
        "precision=fp32",
        "num_workers=0",
        "show_progress=false",
        "templates=single",
        *overrides,
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=settings)
    return run_evaluation(cfg, out_dir)


def split_for(name: str, tmp_path):
    """The test split of ``name`` and a class-name file ``class0``, ``class1``, ..."""
    root = tmp_path / name
    paths = write_split(name, root, count=1 if name == "cityscapes" else 2)
    class_file = tmp_path / f"{name}_classes.txt"
    class_file.write_text("".join(f"class{i}\n" for i in range(PROTOCOL[name]["classes"])))
    return root, class_file, paths


@pytest.mark.parametrize("name", ["voc21", "context60", "ade20k", "cityscapes"])
def test_evaluation_scores_the_protocol(name, tmp_path, monkeypatch):
    root, class_file, paths = split_for(name, tmp_path)
    expected = expected_miou(name, paths)
    results = evaluate(name, root, class_file, tmp_path / "eval", monkeypatch)
    assert results["num_images"] == len(paths)
    assert results["miou"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "name, change",
    [
        ("voc21", {"prob": None, "area": None}),  # alone, prob=None meets argmax ties
        ("voc21", {"scale": 40.0}),
        ("voc21", {"area": None}),
        ("context60", {"prob": None}),
        ("context60", {"scale": 40.0}),
    ],
)
def test_the_scenes_pin_the_background_rules(name, change, tmp_path, monkeypatch):
    """The expected score changes with VOC21's and Context60's probability threshold, logit
    scale and (VOC21) area threshold: the golden test above pins each of them."""
    _, _, paths = split_for(name, tmp_path)
    expected = expected_miou(name, paths)
    monkeypatch.setitem(PROTOCOL, name, {**PROTOCOL[name], **change})
    assert abs(expected_miou(name, paths) - expected) > 1
