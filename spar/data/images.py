"""Image files in, normalised (B, 3, H, W) tensors out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

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


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1] (RGB).

    Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def resize_to_fit(image: torch.Tensor, bounds: Sequence[int] = (2048, 672)) -> torch.Tensor:
    """Resize keeping the aspect ratio so the image fits (long side, short side) ``bounds``.

    The image is scaled by ``min(long / max(H, W), short / min(H, W))``, up or down, as in the
    mmsegmentation ``Resize(keep_ratio=True)`` used by the paper's protocol.

    Args:
        image: (3, H, W) or (B, 3, H, W) float tensor.
        bounds: (long, short) bound in pixels.
    Returns:
        The resized tensor, same number of dimensions.
    """
    long_bound, short_bound = max(bounds), min(bounds)
    height, width = image.shape[-2:]
    scale = min(long_bound / max(height, width), short_bound / min(height, width))
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    if size == (height, width):
        return image
    batched = image if image.ndim == 4 else image[None]
    resized = F.interpolate(
        batched, size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return resized if image.ndim == 4 else resized[0]


def to_model_input(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) in [0, 1] -> (B, 3, H, W) normalised with ``mean``/``std``."""
    batched = image if image.ndim == 4 else image[None]
    mean_t = torch.tensor(mean, dtype=batched.dtype, device=batched.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=batched.dtype, device=batched.device).view(1, 3, 1, 1)
    return (batched - mean_t) / std_t


def prepare_image(
    image: str | Path | torch.Tensor,
    bounds: Sequence[int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one way from an image to model input: load, resize to fit, normalise, move.

    Args:
        image: an image file, or a (3, H, W) float tensor in [0, 1].
        bounds: (long, short) bound for :func:`resize_to_fit`; ``None`` keeps the size.
        mean, std: the backbone's input normalisation.
        device: where the model input goes (default: where ``image`` is).

    Returns:
        (pixels, inputs): the resized (3, H, W) image in [0, 1], and the normalised
        (1, 3, H, W) model input on ``device``.
    """
    pixels = load_image(image) if isinstance(image, str | Path) else image
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"image must be a path or a (3, H, W) tensor, got {tuple(pixels.shape)}")
    if bounds is not None:
        pixels = resize_to_fit(pixels, bounds)
    return pixels, to_model_input(pixels, mean, std).to(device or pixels.device)
