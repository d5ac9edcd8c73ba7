"""Pictures: class palettes, segmentation overlays with a legend, PCA views of dense features.

``segmentation_picture`` and ``feature_picture`` do a whole image in one call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from .class_names import display_names
from .config import renamed_arguments
from .imaging import ImageInput, prepare_images
from .protocol import PROTOCOL
from .segmentation import OpenVocabSegmenter
from .utils import module_device

#: Pixel size of the legend and title text. Pillow's scalable default font (FreeType) is used:
#: its 10 px default, like the old bitmap font, leaves a one- or two-pixel space between words,
#: so "SPAR student" read as "SPARstudent".
FONT_SIZE = 13


@functools.lru_cache(maxsize=4)
def caption_font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` pixels (needs Pillow built with FreeType, as
    its wheels are)."""
    return ImageFont.load_default(size=size)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 distinct colours; class 0 is black, then the bit-interleaved
    sequence used by Pascal VOC (so VOC masks look familiar)."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def overlay(
    image: torch.Tensor,
    mask: torch.Tensor,
    class_names: Sequence[str],
    alpha: float = 0.55,
) -> Image.Image:
    """Blend a class mask over an image and append a legend of the classes present.

    Args:
        image: (3, H, W) float in [0, 1].
        mask: (H, W) integer class indices into ``class_names``.
        class_names: one display name per class.
        alpha: weight of the mask colours.
    """
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from image {tuple(image.shape)}")
    colours = palette(max(len(class_names), 1))
    mask_np = mask.detach().cpu().numpy().astype(np.int64)
    base = np.asarray(to_pil(image), dtype=np.float32)
    blended = (1 - alpha) * base + alpha * colours[mask_np].astype(np.float32)
    picture = Image.fromarray(blended.round().astype(np.uint8))
    present = [int(c) for c in np.unique(mask_np)]
    return _with_legend(picture, [(class_names[c], tuple(colours[c])) for c in present])


def _with_legend(picture: Image.Image, entries: list[tuple[str, tuple[int, ...]]]) -> Image.Image:
    font = caption_font()
    row = FONT_SIZE + 5
    legend_width = 12 + max((int(font.getlength(name)) for name, _ in entries), default=0) + 24
    height = max(picture.height, row * len(entries) + 8)
    canvas = Image.new("RGB", (picture.width + legend_width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (name, colour) in enumerate(entries):
        top = 4 + index * row
        left = picture.width + 6
        draw.rectangle([left, top, left + 12, top + 12], fill=colour, outline="black")
        draw.text((left + 18, top), name, fill="black", font=font)
    return canvas


def pca_rgb(
    feature_maps: Sequence[torch.Tensor], size: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """First three principal components of dense features as RGB, one basis for all maps.

    Fitting one basis on all maps together makes, e.g., teacher and student pictures directly
    comparable: the same colour means the same direction in feature space.

    Args:
        feature_maps: tensors of shape (C, h_i, w_i).
        size: optional (H, W) to upsample every picture to (nearest, so patches stay visible).
    Returns:
        (3, h_i, w_i) (or (3, H, W)) float tensors in [0, 1].
    """
    flat = [f.detach().float().flatten(1).T for f in feature_maps]
    samples = torch.cat(flat)
    samples = F.normalize(samples, dim=1)
    center = samples.mean(0, keepdim=True)
    _, _, basis = torch.linalg.svd(samples - center, full_matrices=False)
    components = (samples - center) @ basis[:3].T
    low = torch.quantile(components, 0.01, dim=0)
    high = torch.quantile(components, 0.99, dim=0)
    scaled = ((components - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    pictures, start = [], 0
    for feature in feature_maps:
        count = feature.shape[1] * feature.shape[2]
        rgb = scaled[start : start + count].T.reshape(3, *feature.shape[1:])
        if size is not None:
            rgb = F.interpolate(rgb[None], size=size, mode="nearest")[0]
        pictures.append(rgb)
        start += count
    return pictures


def side_by_side(
    pictures: Sequence[Image.Image], titles: Sequence[str], gap: int = 8
) -> Image.Image:
    """Place pictures left to right with a title above each."""
    font = caption_font()
    title_height = FONT_SIZE + 5  # the text is drawn 2 px down; descenders end above
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    height = max(p.height for p in pictures) + title_height
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left = 0
    for picture, title in zip(pictures, titles, strict=True):
        draw.text((left + 2, 2), title, fill="black", font=font)
        canvas.paste(picture, (left, title_height))
        left += picture.width + gap
    return canvas


def pca_picture(
    pixels: torch.Tensor, feature_maps: Sequence[torch.Tensor], titles: Sequence[str]
) -> Image.Image:
    """The image beside the PCA pictures of its feature maps in one colour basis
    (:func:`pca_rgb`), each upsampled to the image, under ``titles`` (the image's first).

    Args:
        pixels: (3, H, W) image in [0, 1].
        feature_maps: (C, h_i, w_i) maps of the image (e.g. teacher and student).
        titles: ``1 + len(feature_maps)`` titles.
    """
    pictures = pca_rgb(feature_maps, size=tuple(pixels.shape[-2:]))
    return side_by_side([to_pil(pixels), *(to_pil(p) for p in pictures)], titles)


def source_title(dense: object) -> str:
    """A picture title for a dense-feature source: the teacher with its stride, or the class."""
    stride = getattr(dense, "stride", None)
    if stride is not None and hasattr(dense, "window"):
        return f"teacher (stride {stride[0] if stride[0] == stride[1] else tuple(stride)})"
    return type(dense).__name__


def _prepared(
    backbone: nn.Module, image: ImageInput, bounds: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """((3, H, W) image in [0, 1] resized to fit ``bounds``, normalised (1, 3, H, W) input on
    the backbone's device): :func:`spar.imaging.prepare_images` with the backbone's mean/std
    (any object with ``mean``, ``std`` and parameters, not only a ``DenseBackbone``)."""
    prepared = prepare_images(image, backbone.mean, backbone.std, bounds, module_device(backbone))
    return prepared.pixels[0], prepared.inputs


@torch.no_grad()
def segmentation_picture(
    backbone: nn.Module,
    image: ImageInput,
    classes: Sequence[str | Sequence[str]],
    *,
    dense: nn.Module | None = None,
    bounds: Sequence[int] | None = PROTOCOL.bounds,
    templates: str | Sequence[Callable[[str], str]] = PROTOCOL.templates,
    logit_scale: float = PROTOCOL.logit_scale,
    logit_bias: float = PROTOCOL.logit_bias,
    prob_threshold: float | None = PROTOCOL.prob_threshold,
    area_threshold: float | None = PROTOCOL.area_threshold,
    refiner: nn.Module | None = None,
    upsampler: nn.Module | None = None,
) -> tuple[Image.Image, torch.Tensor]:
    """Segment one image with class names; returns (overlay with a legend, (H, W) class mask).

    Args:
        backbone: a dense backbone (its single pass and its text encoder are used).
        image: an image file, a ``PIL.Image`` or a (3, H, W) tensor in [0, 1]; resized to fit
            ``bounds`` (long, short) keeping its aspect ratio (``None``: as it is).
        classes: class entries, each a name or synonyms (``"person, pedestrian"``).
        dense: other dense features to segment with, e.g. a ``SlidingWindowTeacher``.
        templates: prompt templates (a set name of ``spar.text_classifier.TEMPLATE_SETS``).
        bounds, templates, logit_scale, logit_bias, prob_threshold, area_threshold: default to
            the evaluation protocol's (:data:`spar.protocol.PROTOCOL`).
        refiner, upsampler: optional refinement stages (``spar.refine.build_stages``).
    """
    pixels, inputs = _prepared(backbone, image, bounds)
    segmenter = OpenVocabSegmenter.from_backbone(
        backbone,
        classes,
        dense=dense,
        templates=templates,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        prob_threshold=prob_threshold,
        area_threshold=area_threshold,
        refiner=refiner,
        upsampler=upsampler,
    )
    mask = segmenter.predict(inputs)[0].cpu()
    names = display_names(classes)
    return overlay(pixels, mask, names), mask


@torch.no_grad()
@renamed_arguments()
def feature_picture(
    backbone: nn.Module,
    image: ImageInput,
    *,
    dense: nn.Module | None = None,
    bounds: Sequence[int] | None = PROTOCOL.bounds,
) -> Image.Image:
    """The image beside the PCA of the backbone's single pass, and of ``dense`` (another
    dense-feature source, e.g. a ``SlidingWindowTeacher``) in the same colour basis."""
    pixels, inputs = _prepared(backbone, image, bounds)
    maps = [backbone(inputs)[0].float()]
    titles = ["image", "single pass"]
    if dense is not None:
        maps.append(dense(inputs)[0].float())
        titles.append(source_title(dense))
    return pca_picture(pixels, maps, titles)
