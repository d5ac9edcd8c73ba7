"""Images as tensors: decode files, resize as the evaluation protocol does, normalise, batch.

The low layer under both :mod:`spar.models` (``DenseBackbone.prepare``) and :mod:`spar.data`
(folders and datasets): it imports nothing of spar. :func:`prepare_images` is the one path from
images (files, Pillow images, tensors) to a backbone's input batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .protocol import PROTOCOL

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


class ImageValueError(ValueError):
    """A float image (Pillow mode ``F``, e.g. a 32-bit float TIFF) holds values outside [0, 1]
    or non-finite ones: spar will not guess its scale (0-255? 0-65535? HDR?)."""


def _float_grey(image: Image.Image, source: str) -> np.ndarray:
    """(H, W) float32 of a mode ``F`` image, whose values must lie in [0, 1].

    Raises :class:`ImageValueError` naming ``source`` and the value range otherwise (such a
    file was clipped to white before, without a word).
    """
    grey = np.asarray(image, dtype=np.float32)
    if grey.size == 0:
        return grey
    finite = np.isfinite(grey)
    if not finite.all():
        raise ImageValueError(
            f"float image {source} holds {int((~finite).sum())} NaN or infinite values; "
            "float images must hold values in [0, 1]"
        )
    low, high = float(grey.min()), float(grey.max())
    if low < 0.0 or high > 1.0:
        hint = "divide it by 255 or save it as 8-bit" if high <= 255.0 else "scale it to [0, 1]"
        raise ImageValueError(
            f"float image {source} has values in [{low:g}, {high:g}], outside [0, 1]: {hint}"
        )
    return grey


def _to_rgb_array(image: Image.Image, source: str = "given as a PIL.Image") -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] of any Pillow mode; 16-bit modes are scaled by 65535, float
    ones (mode ``F``) are taken as they are and must lie in [0, 1] (:func:`_float_grey`).
    ``source`` names the image in errors."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float32)
        grey = np.clip(grey / 65535.0, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = _float_grey(image, source)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1] (RGB).

    8-bit images are divided by 255, 16-bit ones (PNG ``I;16``) by 65535; float ones (32-bit
    float TIFF, Pillow mode ``F``) are taken as they are; grey images are repeated over the
    three channels.

    Raises ``ValueError`` naming the file when it cannot be decoded,
    :class:`ImageValueError` (a ``ValueError``) naming the file and the value range when a
    float image holds values outside [0, 1] (they are not guessed at nor clipped), and
    :class:`ImageTooLargeError` (a ``ValueError``) when it declares more pixels than the
    ``max_image_pixels`` setting (:func:`set_max_image_pixels`); it is not decoded then.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with _open_checked(path) as image:
            array = _to_rgb_array(image, str(path))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


#: cv2's fixed-point resize weights are multiples of 1/2048 (``INTER_RESIZE_COEF_BITS`` = 11).
_COEF_SCALE = 2048


def fit_size(height: int, width: int, bounds: Sequence[float]) -> tuple[int, int]:
    """(h, w) that an (H, W) image is resized to so that it fits ``bounds`` = (long, short):
    the one keep-ratio rule of spar (evaluation, LPOSS, the training views, whose bounds are
    scaled by a drawn ratio and so need not be whole numbers).

    The scale is ``min(long / max(H, W), short / min(H, W))``, up or down, and each side is
    rounded as ``int(side * scale + 0.5)`` (at least 1): the rule of mmcv's ``rescale_size`` and
    ``_scale_size`` (open-mmlab/mmcv ``mmcv/image/geometric.py``, commit a8073c74), which
    mmseg's ``Resize(scale=bounds, keep_ratio=True)`` of the paper's protocol calls.
    """
    long_bound, short_bound = max(bounds), min(bounds)
    scale = min(long_bound / max(height, width), short_bound / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _linear_taps(
    size_in: int, size_out: int, clamp_weights: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and fixed-point weights of cv2's ``INTER_LINEAR`` along one axis.

    Output pixel ``d`` samples ``f = float32((d + 0.5) * size_in / size_out - 0.5)`` (half-pixel
    centres, no antialiasing); its two weights, ``1 - frac(f)`` and ``frac(f)``, are each rounded
    (half to even) to a multiple of 1/2048. Along x (``clamp_weights``) cv2 moves a sample left
    of the first or right of the last pixel onto that pixel with weights (2048, 0); along y it
    keeps the weights and clips the row indices, which rounds differently in the vertical pass.

    Returns:
        first, second: (size_out,) int64 source indices in [0, size_in).
        w_first, w_second: (size_out,) int32 weights (in 1/2048).
    """
    scale = 1.0 / (size_out / size_in)  # as cv2: 1 / inv_scale, inv_scale = out / in (double)
    where = ((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(where).astype(np.int64)
    frac = (where - first.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        frac[(first < 0) | (first >= size_in - 1)] = 0
    second = np.clip(first + 1, 0, size_in - 1)
    first = np.clip(first, 0, size_in - 1)
    w_first = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    w_second = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    return tuple(torch.from_numpy(a).to(device) for a in (first, second, w_first, w_second))


def resize_levels_bilinear(levels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of 8-bit levels, bit for bit as ``cv2.resize(INTER_LINEAR)`` on uint8.

    Half-pixel centres and no antialiasing (downscaling samples 2x2 neighbours only), in cv2's
    fixed-point arithmetic: weights in 1/2048, a horizontal pass in integers, then the
    vertical pass of cv2's vectorised kernel, ``(hi16((a >> 4) * b0) + hi16((c >> 4) * b1)
    + 2) >> 2`` saturated to [0, 255]. Matches opencv-python-headless 5.1 exactly on the test
    images of ``tests/test_resize_mmcv.py`` (JPEGs and noise, down- and up-scaled).

    Args:
        levels: (..., H, W) integer tensor with values in [0, 255].
        size: (h, w) output size.
    Returns:
        (..., h, w) int32 levels in [0, 255], on ``levels``' device.
    """
    height, width = levels.shape[-2:]
    x0, x1, a0, a1 = _linear_taps(width, size[1], True, levels.device)
    y0, y1, b0, b1 = _linear_taps(height, size[0], False, levels.device)
    source = levels.to(torch.int32)
    rows = source.index_select(-1, x0) * a0  # (..., H, w) horizontal pass, <= 255 * 2048
    rows += source.index_select(-1, x1) * a1
    rows >>= 4
    out = rows.index_select(-2, y0).mul_(b0[:, None]).bitwise_right_shift_(16)
    out += rows.index_select(-2, y1).mul_(b1[:, None]).bitwise_right_shift_(16)
    return out.add_(2).bitwise_right_shift_(2).clamp_(0, 255)


def resize_to_fit(image: torch.Tensor, bounds: Sequence[int] = PROTOCOL.bounds) -> torch.Tensor:
    """Resize keeping the aspect ratio so the image fits (long side, short side) ``bounds``.

    The paper's protocol, mmseg's ``Resize(scale=bounds, keep_ratio=True)``: the size of
    :func:`fit_size` (mmcv's ``rescale_size``), and mmcv's ``imresize`` (open-mmlab/mmcv
    ``mmcv/image/geometric.py``, commit a8073c74), i.e. ``cv2.resize(INTER_LINEAR)`` of the
    uint8 image: bilinear, half-pixel centres, *no* antialiasing, whole 8-bit levels out. The
    image is taken to 8-bit levels (``round(255 * x)``, clipped to [0, 255]; 8-bit files load
    as exact levels, 16-bit ones are quantised as mmseg's 8-bit loading does), resized by
    :func:`resize_levels_bilinear` (exactly cv2's arithmetic) and divided by 255 again.
    An image already at its fitted size is returned unchanged.

    Args:
        image: (3, H, W) or (B, 3, H, W) float tensor in [0, 1].
        bounds: (long, short) bound in pixels.
    Returns:
        The resized tensor, same number of dimensions, dtype and device; values k / 255.
    """
    height, width = image.shape[-2:]
    size = fit_size(height, width, bounds)
    if size == (height, width):
        return image
    levels = (image.float() * 255).round().clamp(0, 255)
    resized = resize_levels_bilinear(levels, size)
    return (resized.float() / 255).to(image.dtype)


def to_model_input(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) in [0, 1] -> (B, 3, H, W) normalised with ``mean``/``std``."""
    batched = image if image.ndim == 4 else image[None]
    mean_t = torch.tensor(mean, dtype=batched.dtype, device=batched.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=batched.dtype, device=batched.device).view(1, 3, 1, 1)
    return (batched - mean_t) / std_t


ImageInput = str | Path | Image.Image | torch.Tensor
"""An image file, a Pillow image, or a (3, H, W) float tensor in [0, 1] (RGB)."""


class PreparedImages(NamedTuple):
    """What :func:`prepare_images` returns.

    Attributes:
        inputs: (B, 3, h, w) normalised model input on the requested device.
        pixels: (B, 3, h, w) the resized images in [0, 1] (for overlays), on the device the
            images came from (the CPU for files and Pillow images).
        sizes: the (H, W) of each image before resizing.
    """

    inputs: torch.Tensor
    pixels: torch.Tensor
    sizes: list[tuple[int, int]]


def image_tensor(image: ImageInput) -> torch.Tensor:
    """One image as a (3, H, W) float tensor in [0, 1]: files are read with :func:`load_image`,
    Pillow images converted as it converts them (16-bit by 65535, grey repeated), tensors
    checked and returned as they are.

    Raises ``ValueError`` naming the problem for any other object or tensor shape.
    """
    if isinstance(image, str | Path):
        return load_image(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.ascontiguousarray(_to_rgb_array(image))).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            "an image must be a path, a PIL.Image or a (3, H, W) float tensor in [0, 1], got "
            f"{type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must have shape (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"an image tensor must be float in [0, 1], got {image.dtype}")
    return image


def _image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image, a (B, 3, H, W) tensor or a list/tuple of images -> a list of single images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError("prepare_images needs at least one image, got an empty list")
        return list(images)
    return [images]


def prepare_images(
    images: ImageInput | Sequence[ImageInput],
    mean: Sequence[float],
    std: Sequence[float],
    bounds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> PreparedImages:
    """Images -> a backbone's input batch: load, resize to fit, normalise, stack, move.

    Args:
        images: an image file, a ``PIL.Image``, a (3, H, W) float tensor in [0, 1], a
            (B, 3, H, W) one, or a list of these.
        mean, std: the model's per-channel input normalisation.
        bounds: (long, short) bound for :func:`resize_to_fit` (the evaluation protocol's
            resize, mmcv's exactly); ``None`` keeps each image's size.
        device: where the model input goes (default: where the images are).

    Returns:
        :class:`PreparedImages` ``(inputs, pixels, sizes)``: the normalised (B, 3, h, w) batch
        on ``device``, the resized (B, 3, h, w) images in [0, 1], the original (H, W) sizes.

    Raises ``ValueError`` when the images (after resizing) differ in size: such images cannot
    share a batch, prepare them one at a time.
    """
    tensors = [image_tensor(image) for image in _image_list(images)]
    sizes = [tuple(tensor.shape[-2:]) for tensor in tensors]
    if bounds is not None:
        tensors = [resize_to_fit(tensor, bounds) for tensor in tensors]
    resized = {tuple(tensor.shape[-2:]) for tensor in tensors}
    if len(resized) > 1:
        raise ValueError(
            f"images of different sizes {sorted(resized)} cannot share a batch: prepare them "
            "one at a time"
        )
    pixels = torch.stack(tensors)
    inputs = to_model_input(pixels.to(device or pixels.device), mean, std)
    return PreparedImages(inputs, pixels, sizes)
