"""The paper's training augmentation, drawn as an explicit plan so it can be recorded and keyed.

A plan is drawn from the source image size and a seeded generator, then applied to the pixels.
Keeping the two apart lets the teacher cache store exactly which view of an image a feature map
belongs to, and lets a resumed run draw the very same views again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..imaging import fit_size


@dataclass(frozen=True)
class AugmentationRecipe:
    """How training views are drawn (defaults: the paper's SA-1B recipe).

    Attributes:
        bounds: (long, short) side bound the image is resized to fit, keeping its aspect ratio.
        scale_range: the bound is multiplied by a ratio drawn uniformly from this range.
        crop_prob: probability of a random crop (otherwise the full resized image is kept).
        crop_fraction: each crop side is this fraction (uniform) of the image side...
        min_crop: ...and at least this many pixels (or the whole side, if shorter).
        min_short_side: views whose short side is smaller are upscaled to it (aspect kept).
        size_multiple: final sides are rounded down to multiples of this (the patch size).
        flip_prob: probability of a horizontal flip.
    """

    bounds: tuple[int, int] = (2048, 1024)
    scale_range: tuple[float, float] = (0.5, 1.0)
    crop_prob: float = 0.5
    crop_fraction: tuple[float, float] = (0.4, 1.0)
    min_crop: int = 512
    min_short_side: int = 512
    size_multiple: int = 16
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        low, high = self.crop_fraction
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_fraction must lie in (0, 1], got {self.crop_fraction}")
        for name in ("crop_prob", "flip_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.bounds) <= 0 or self.size_multiple <= 0:
            raise ValueError(f"bounds and size_multiple must be positive: {self}")
        if self.min_short_side < self.size_multiple:
            raise ValueError(
                f"min_short_side {self.min_short_side} must be at least size_multiple "
                f"{self.size_multiple}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentationRecipe:
        """Build from a config mapping; lists become tuples, unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()})


@dataclass(frozen=True)
class AugmentationPlan:
    """One drawn view of one image.

    Attributes:
        source_size: (H, W) of the image the plan was drawn for.
        resized: (h, w) the whole image is first resized to.
        crop: (top, left, height, width) of the crop in the resized image.
        output: (H_out, W_out) the crop is finally resized to (multiples of ``size_multiple``).
        flip: whether the view is mirrored left-right.
    """

    source_size: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    output: tuple[int, int]
    flip: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentationPlan:
        return cls(
            source_size=tuple(values["source_size"]),
            resized=tuple(values["resized"]),
            crop=tuple(values["crop"]),
            output=tuple(values["output"]),
            flip=bool(values["flip"]),
        )


def plan_generator(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for one draw, identified by ``seed`` and integer ``keys``."""
    return np.random.default_rng([seed, *keys])


def upscale_to_short_side(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) of an (H, W) view upscaled, keeping its aspect ratio, so that its short side is at
    least ``short_side``; a view already that large is kept. Not a fit to bounds
    (:func:`spar.imaging.fit_size`): sides are rounded *up* (``ceil``, with a 1e-6 slack for
    the float error of an exact ratio), so the short side reaches ``short_side`` exactly."""
    short = min(height, width)
    if short >= short_side:
        return height, width
    upscale = short_side / short
    return math.ceil(height * upscale - 1e-6), math.ceil(width * upscale - 1e-6)


def draw_plan(
    source_size: tuple[int, int], recipe: AugmentationRecipe, rng: np.random.Generator
) -> AugmentationPlan:
    """Draw one view of an image of ``source_size`` = (H, W) following ``recipe``.

    The image is first resized to fit the recipe's bounds times a drawn ratio by the protocol's
    keep-ratio rule, :func:`spar.imaging.fit_size`; then cropped; then upscaled to
    ``min_short_side`` (:func:`upscale_to_short_side`) and cut to ``size_multiple``.
    """
    height, width = source_size
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {source_size}")
    ratio = rng.uniform(*recipe.scale_range)
    resized = fit_size(height, width, (max(recipe.bounds) * ratio, min(recipe.bounds) * ratio))

    crop = (0, 0, *resized)
    if rng.random() < recipe.crop_prob:
        sides = []
        for side in resized:
            fraction = rng.uniform(*recipe.crop_fraction)
            sides.append(min(side, max(recipe.min_crop, int(side * fraction))))
        top = int(rng.integers(0, resized[0] - sides[0] + 1))
        left = int(rng.integers(0, resized[1] - sides[1] + 1))
        crop = (top, left, sides[0], sides[1])

    out_h, out_w = upscale_to_short_side(crop[2], crop[3], recipe.min_short_side)
    multiple = recipe.size_multiple
    output = tuple(max(multiple, side // multiple * multiple) for side in (out_h, out_w))
    flip = bool(rng.random() < recipe.flip_prob)
    return AugmentationPlan((height, width), resized, crop, output, flip)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]


def apply_plan(image: torch.Tensor, plan: AugmentationPlan) -> torch.Tensor:
    """(3, H, W) image -> (3, H_out, W_out) view described by ``plan``.

    Raises ``ValueError`` when the image is not the size the plan was drawn for.
    """
    if tuple(image.shape[-2:]) != tuple(plan.source_size):
        raise ValueError(
            f"plan drawn for a {plan.source_size} image applied to {tuple(image.shape[-2:])}"
        )
    view = _resize(image, plan.resized)
    top, left, height, width = plan.crop
    view = _resize(view[:, top : top + height, left : left + width], plan.output)
    return view.flip(-1) if plan.flip else view
