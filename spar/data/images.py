"""Image folders, and the image functions of :mod:`spar.imaging` under their old address.

Decoding, the protocol's resize, normalisation and batching live in :mod:`spar.imaging` (the low
layer that :mod:`spar.models` may import too); they are re-exported here so that
``from spar.data.images import resize_to_fit`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..imaging import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    PreparedImages,
    fit_size,
    image_size,
    image_tensor,
    load_image,
    max_image_pixels,
    prepare_images,
    resize_levels_bilinear,
    resize_to_fit,
    set_max_image_pixels,
    to_model_input,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageTooLargeError",
    "PreparedImages",
    "fit_size",
    "image_size",
    "image_tensor",
    "list_images",
    "load_image",
    "max_image_pixels",
    "prepare_image",
    "prepare_images",
    "resize_levels_bilinear",
    "resize_to_fit",
    "set_max_image_pixels",
    "to_model_input",
]

#: File suffixes that :func:`list_images` takes for images (compared in lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted); a single image file is returned alone.

    Raises ``FileNotFoundError`` naming ``root`` when it does not exist or holds no images.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths


def prepare_image(
    image: str | Path | torch.Tensor,
    bounds: Sequence[int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image to model input, as :func:`spar.imaging.prepare_images` (which new code, or
    ``backbone.prepare``, should call) with this older signature and return value.

    Args:
        image: an image file, a ``PIL.Image``, or a (3, H, W) float tensor in [0, 1].
        bounds: (long, short) bound for :func:`resize_to_fit`; ``None`` keeps the size.
        mean, std: the backbone's input normalisation.
        device: where the model input goes (default: where ``image`` is).

    Returns:
        (pixels, inputs): the resized (3, H, W) image in [0, 1], and the normalised
        (1, 3, H, W) model input on ``device``.
    """
    prepared = prepare_images(image_tensor(image), mean, std, bounds, device)
    return prepared.pixels[0], prepared.inputs
