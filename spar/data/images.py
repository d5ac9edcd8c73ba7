"""Image files in, normalised (B, 3, H, W) tensors out."""

from __future__ import annotations

import warnings
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


#: Images with more pixels than this are not decoded (see :func:`set_max_image_pixels`):
#: 100 megapixels, e.g. 10000x10000, far above any training or benchmark image.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
_max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageTooLargeError(ValueError):
    """An image file declares more pixels than the ``max_image_pixels`` setting allows."""


def set_max_image_pixels(limit: int | None) -> None:
    """Set the ``max_image_pixels`` setting of this process: :func:`load_image` skips (raises
    :class:`ImageTooLargeError`, which every reader counts as an unreadable image) any file
    whose header declares more pixels, before decoding it. ``None``: no limit of spar's own
    (Pillow still refuses decompression bombs above ``2 * PIL.Image.MAX_IMAGE_PIXELS``).

    Entry points set it from their config (``max_image_pixels``); data-loading workers, forked
    from the process, inherit it.
    """
    global _max_image_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_image_pixels must be an integer >= 1 or null, got {limit!r}")
    _max_image_pixels = limit


def max_image_pixels() -> int | None:
    """The current ``max_image_pixels`` setting (see :func:`set_max_image_pixels`)."""
    return _max_image_pixels


def _open_checked(path: Path) -> Image.Image:
    """``Image.open(path)`` (header only) after the size check; errors name the file."""
    try:
        with warnings.catch_warnings():  # spar's own limit below replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"image {path} is a decompression bomb: {error}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    width, height = image.size
    if _max_image_pixels is not None and width * height > _max_image_pixels:
        image.close()
        raise ImageTooLargeError(
            f"image {path} has {width}x{height} = {width * height} pixels, above "
            f"max_image_pixels={_max_image_pixels}; skipped without decoding it"
        )
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels.

    Raises ``ValueError`` naming the file when it cannot be read or is above the limit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with _open_checked(path) as image:
        width, height = image.size
    return height, width


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] of any Pillow mode; 16-bit modes are scaled by 65535."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float32)
        grey = np.clip(grey / 65535.0, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1] (RGB).

    8-bit images are divided by 255, 16-bit ones (PNG ``I;16``) by 65535; grey images are
    repeated over the three channels.

    Raises ``ValueError`` naming the file when it cannot be decoded, and
    :class:`ImageTooLargeError` (a ``ValueError``) when it declares more pixels than the
    ``max_image_pixels`` setting (:func:`set_max_image_pixels`); it is not decoded then.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with _open_checked(path) as image:
            array = _to_rgb_array(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


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
