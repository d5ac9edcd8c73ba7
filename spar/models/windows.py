"""Where the teacher's windows go and how their maps are stitched: the geometry, no model.

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
r = 1 and this is plain averaging on the patch grid. Follows naomikombol/SPAR
(segmentors/segmentor_vit.py, ``compute_upsample_factor``, ``fold_from_patches``; commit
0f63ff2697096b802153666d6c741203c3c1d491), which takes one square stride; here r, c and the
offsets are computed per axis from (sy, sx), e.g. stride (32, 24) at p = 16 gives r = (1, 2)
and cells of 16 x 8 pixels.

:class:`WindowLayout` plans one image size; :class:`WindowJobs` turns a batch into (image, window)
jobs with the indices that cut every window out (one gather) and add its cells into the canvas
(one ``index_add_``). :class:`spar.models.teacher.SlidingWindowTeacher` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def pad_with_last(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(n,) -> (size,): ``ids`` then copies of its last entry (``ids`` itself when n = size)."""
    if len(ids) == size:
        return ids
    return torch.cat([ids, ids[-1:].expand(size - len(ids))])


@dataclass(frozen=True)
class WindowJobs:
    """Every (image, window) pair of a batch, image-major, and the indices that cut and place it.

    Attributes:
        layout: the window layout of the (padded) images.
        image: (N,) image index of every job.
        window: (N,) window index of every job.
        origins: (W, 2) pixel origin (y, x) of every window.
        cells: (W, k) flat canvas index of every cell of every window's upsampled map.
    """

    layout: WindowLayout
    image: torch.Tensor
    window: torch.Tensor
    origins: torch.Tensor
    cells: torch.Tensor

    @classmethod
    def plan(cls, batch: int, layout: WindowLayout, device: torch.device) -> WindowJobs:
        num_windows = len(layout.origins)
        return cls(
            layout,
            torch.arange(batch, device=device).repeat_interleave(num_windows),
            torch.arange(num_windows, device=device).repeat(batch),
            torch.tensor(layout.origins, device=device),
            layout.cell_indices(device),
        )

    def __len__(self) -> int:
        return len(self.image)

    def crops(self, images: torch.Tensor, jobs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) padded images, (n,) job indices -> (n, 3, h, w) windows, one gather."""
        device = images.device
        image_ids, window_ids = self.image[jobs], self.window[jobs]
        rows = self.origins[window_ids, 0, None] + torch.arange(
            self.layout.window[0], device=device
        )
        cols = self.origins[window_ids, 1, None] + torch.arange(
            self.layout.window[1], device=device
        )
        channels = torch.arange(images.shape[1], device=device).view(1, -1, 1, 1)
        return images[
            image_ids.view(-1, 1, 1, 1), channels, rows[:, None, :, None], cols[:, None, None, :]
        ]

    def targets(self, jobs: torch.Tensor) -> torch.Tensor:
        """(n,) job indices -> (n, k) rows of the (B * rows * cols, C) canvas their cells add to."""
        rows, cols = self.layout.canvas_size
        return self.cells[self.window[jobs]] + (self.image[jobs] * (rows * cols))[:, None]
