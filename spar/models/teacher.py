"""The sliding-window teacher: a frozen backbone run on native-size windows, stitched back.

Layout. The image is first zero-padded to a multiple of the patch size p, exactly as the
backbone pads it (so teacher and student maps have the same shape). Window origins along an axis
are ``0, s, 2s, ...`` while the window still fits, plus one last window flush with the far
border; every pixel is covered. Where the image is smaller than the window along an axis, the
window shrinks to the image's extent along that axis (one window, run at that size), so an image
no larger than the window gives exactly one forward pass.

Stitching (the paper's teacher). Take the smallest r such that p is a multiple of r and the
stride s a multiple of c = p / r. Each window's (h, w) map is upsampled bilinearly by r to cells
of c pixels, added into a canvas of c-pixel cells at the window's offset, divided by the number
of windows covering each cell, and resized bilinearly to the patch grid. For s a multiple of p,
r = 1 and this is plain averaging on the patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_images, pad_to_patch_multiple


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def window_offsets(length: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis: stride steps, the last one flush with the border.

    Raises:
        ValueError: ``stride > window`` would leave pixels between windows uncovered.
    """
    if length <= window:
        return [0]
    if stride > window:
        raise ValueError(
            f"stride {stride} is larger than the window {window}: pixels between "
            "windows would be left uncovered"
        )
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def stitch_upsampling_factor(patch_size: int, stride: int) -> int:
    """Smallest r with ``patch_size % r == 0`` and ``stride % (patch_size // r) == 0``."""
    for r in range(1, patch_size + 1):
        if patch_size % r == 0 and stride % (patch_size // r) == 0:
            return r
    raise AssertionError("r = patch_size always qualifies")


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows of one (padded) image size go.

    Attributes:
        image_size: (H, W) of the padded image, multiples of the patch size.
        window: (h, w) of every window (the requested window, clipped to the image).
        origins: (y, x) pixel origin of every window, row-major.
        factor: (ry, rx) stitching upsampling factors; cells are ``patch // factor`` pixels.
    """

    image_size: tuple[int, int]
    window: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    factor: tuple[int, int]
    patch_size: int

    @classmethod
    def plan(
        cls,
        image_size: tuple[int, int],
        window: tuple[int, int],
        stride: tuple[int, int],
        patch_size: int,
    ) -> WindowLayout:
        height, width = image_size
        win = (min(window[0], height), min(window[1], width))
        ys = window_offsets(height, win[0], stride[0])
        xs = window_offsets(width, win[1], stride[1])
        factor = tuple(stitch_upsampling_factor(patch_size, s) for s in stride)
        return cls((height, width), win, tuple((y, x) for y in ys for x in xs), factor, patch_size)

    @property
    def cell(self) -> tuple[int, int]:
        """(cy, cx) pixel size of a canvas cell."""
        return (self.patch_size // self.factor[0], self.patch_size // self.factor[1])

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(rows, cols) of the cell canvas."""
        return (self.image_size[0] // self.cell[0], self.image_size[1] // self.cell[1])

    @property
    def window_cells(self) -> tuple[int, int]:
        """(rows, cols) of one window's map after upsampling by the factor."""
        return (self.window[0] // self.cell[0], self.window[1] // self.cell[1])

    def cell_indices(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(num_windows, rows * cols) flat canvas index of every cell of every window."""
        rows, cols = self.window_cells
        canvas_cols = self.canvas_size[1]
        row_ids = torch.arange(rows, device=device)[:, None]
        local = (row_ids * canvas_cols + torch.arange(cols, device=device)[None, :]).flatten()
        origins = torch.tensor(self.origins, device=device)
        starts = origins[:, 0] // self.cell[0] * canvas_cols + origins[:, 1] // self.cell[1]
        return starts[:, None] + local[None, :]

    def coverage(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(rows, cols) long, the number of windows covering every canvas cell."""
        indices = self.cell_indices(device).flatten()
        # index_add_ rather than bincount: the same result, and it also runs on the meta device
        counts = indices.new_zeros(self.canvas_size[0] * self.canvas_size[1])
        counts.index_add_(0, indices, torch.ones_like(indices))
        return counts.view(self.canvas_size)


class SlidingWindowTeacher(nn.Module):
    """A backbone run as a sliding window and stitched into one map aligned with the image.

    The teacher follows the backbone contract itself (``patch_size``, ``embed_dim``,
    ``native_size``, ``mean``, ``std``, ``encode_text``), so it can stand in wherever a backbone
    is used for dense features, e.g. in the segmenter.

    Args:
        backbone: any object with the dense-backbone contract (duck typing).
        window: window size (int or (h, w)); defaults to ``backbone.native_size``. Must be a
            multiple of the patch size.
        stride: step between windows in pixels (int or (sy, sx)); need not be a multiple of the
            patch size (24 by default), and must not exceed the window, so that every pixel is
            covered.
        batch_size: at most this many windows go through the backbone at once.
    """

    def __init__(
        self,
        backbone: nn.Module,
        window: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] = 24,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = backbone.patch_size
        self.window = _pair(backbone.native_size if window is None else window, "window")
        self.stride = _pair(stride, "stride")
        if any(w % self.patch_size for w in self.window):
            raise ValueError(
                f"window {self.window} must be a multiple of the patch size {self.patch_size}"
            )
        if any(s > w for s, w in zip(self.stride, self.window, strict=True)):
            raise ValueError(
                f"stride {self.stride} is larger than the window {self.window}: pixels between "
                "windows would be left uncovered; use a stride of at most the window size"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def native_size(self) -> tuple[int, int]:
        return self.backbone.native_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.backbone.std

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.encode_text(texts)

    def layout(self, height: int, width: int) -> WindowLayout:
        """The window layout for an (unpadded) image of ``height`` x ``width``."""
        padded = (
            math.ceil(height / self.patch_size) * self.patch_size,
            math.ceil(width / self.patch_size) * self.patch_size,
        )
        return WindowLayout.plan(padded, self.window, self.stride, self.patch_size)

    def num_windows(self, height: int, width: int) -> int:
        """Windows the teacher runs for one image of ``height`` x ``width``."""
        return len(self.layout(height, width).origins)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, ceil(H/p), ceil(W/p)) stitched, float32."""
        check_images(images)
        layout = self.layout(*images.shape[-2:])
        images = pad_to_patch_multiple(images, self.patch_size)
        if len(layout.origins) == 1:
            return self.backbone(images).float()
        canvas = self._accumulate(images, layout)
        counts = layout.coverage(canvas.device).to(canvas.dtype)
        canvas = canvas / counts
        grid = (layout.image_size[0] // self.patch_size, layout.image_size[1] // self.patch_size)
        if tuple(canvas.shape[-2:]) != grid:
            canvas = F.interpolate(canvas, size=grid, mode="bilinear", align_corners=False)
        return canvas

    def _accumulate(self, images: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Sum of upsampled window maps on the cell canvas, (B, C, rows, cols) in float32.

        Windows of all images form one job list; each chunk of ``batch_size`` jobs is cut out
        with one gather, run through the backbone, and scattered into the canvas with one
        ``index_add_`` (no Python loop over windows).
        """
        batch, channels = images.shape[:2]
        rows, cols = layout.canvas_size
        cells_per_image = rows * cols
        device = images.device
        window_cells = layout.cell_indices(device)  # (W, cells of one window)
        origins = torch.tensor(layout.origins, device=device)  # (W, 2)
        num_windows = len(layout.origins)
        job_image = torch.arange(batch, device=device).repeat_interleave(num_windows)
        job_window = torch.arange(num_windows, device=device).repeat(batch)
        wh, ww = layout.window
        row_offsets = torch.arange(wh, device=device)
        col_offsets = torch.arange(ww, device=device)
        channel_index = torch.arange(channels, device=device).view(1, -1, 1, 1)
        canvas = None
        for start in range(0, len(job_image), self.batch_size):
            image_ids = job_image[start : start + self.batch_size]
            window_ids = job_window[start : start + self.batch_size]
            top = origins[window_ids, 0, None] + row_offsets  # (n, wh)
            left = origins[window_ids, 1, None] + col_offsets  # (n, ww)
            crops = images[
                image_ids.view(-1, 1, 1, 1),
                channel_index,
                top[:, None, :, None],
                left[:, None, None, :],
            ]
            features = self.backbone(crops).float()
            if layout.factor != (1, 1):
                features = F.interpolate(
                    features, size=layout.window_cells, mode="bilinear", align_corners=False
                )
            if canvas is None:
                canvas = features.new_zeros(batch * cells_per_image, features.shape[1])
            targets = window_cells[window_ids] + (image_ids * cells_per_image)[:, None]
            flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
            canvas.index_add_(0, targets.flatten(), flat)
        return canvas.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


TEACHER_SETTINGS = ("window", "stride", "batch_size")


def build_teacher(
    backbone: nn.Module, settings: Mapping[str, Any] | None = None
) -> SlidingWindowTeacher:
    """The sliding-window teacher that a ``configs/teacher`` node describes.

    The one place that turns configuration into a teacher (training, evaluation, the
    single-image tools, the demo and the speed benchmark all call it).

    Args:
        backbone: the frozen backbone the teacher runs.
        settings: ``window`` (``None``: the backbone's native size), ``stride`` and
            ``batch_size``; other keys (e.g. the training cache's) are not the teacher's and
            are ignored. Missing keys take :class:`SlidingWindowTeacher`'s defaults.
    """
    settings = settings or {}
    return SlidingWindowTeacher(
        backbone, **{k: settings[k] for k in TEACHER_SETTINGS if k in settings}
    )
