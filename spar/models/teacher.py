"""The sliding-window teacher: a frozen backbone run on native-size windows, stitched back.

Where the windows go and how their maps are stitched is :mod:`spar.models.windows`; the window
batches on CUDA are sized by :mod:`spar.models.cuda_memory`; the ``configs/teacher`` node, its
checks and :func:`build_teacher` are :mod:`spar.models.teacher_config`. Their public names are
importable from here too.

Efficiency. A low-precision teacher runs its own copy of the weights in that dtype (no casts at
every call), window batches are capped by ``batch_size`` and sized from free memory on CUDA, and
the window forward can be compiled; see :class:`SlidingWindowTeacher`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_images, pad_to_patch_multiple
from .compiling import check_compile_setting, compile_mode
from .cuda_memory import (  # noqa: F401 - FREE_MEMORY_FRACTION: re-exported
    FREE_MEMORY_FRACTION,
    cuda_free_bytes,
    cuda_peak_bytes,
    window_batch_size,
)
from .teacher_config import (  # noqa: F401 - all but TeacherSettings and _pair: re-exported
    FEATURE_SOURCES,
    TEACHER_SETTINGS,
    TeacherSettings,
    _pair,
    build_teacher,
    check_feature_source,
    check_teacher_settings,
    dense_features,
)
from .windows import (  # noqa: F401 - window_offsets, stitch_upsampling_factor: re-exported
    WindowJobs,
    WindowLayout,
    pad_with_last,
    stitch_upsampling_factor,
    window_offsets,
)

PROBE_WINDOWS = 4  # windows run to measure the memory of one window (CUDA)


def low_precision_copy(
    backbone: nn.Module, dtype: torch.dtype | None, copy: bool
) -> nn.Module | None:
    """The frozen, eval-mode copy of ``backbone`` in ``dtype`` that runs the windows, or ``None``
    where the backbone itself runs them (``dtype`` is ``None``, or ``copy`` is false: then the
    backbone is converted to ``dtype`` in place)."""
    if dtype is None:
        return None
    if not copy:
        backbone.to(dtype)
        return None
    return deepcopy(backbone).to(dtype).requires_grad_(False).eval()


class SlidingWindowTeacher(nn.Module):
    """A backbone run as a sliding window and stitched into one map aligned with the image.

    The teacher follows the backbone contract itself (``patch_size``, ``embed_dim``,
    ``native_size``, ``mean``, ``std``, ``encode_text``), so it can stand in wherever a backbone
    is used for dense features, e.g. in the segmenter.

    Precision. With ``dtype`` (e.g. ``torch.bfloat16``) the windows run through a frozen copy of
    the backbone's weights in that dtype, rather than autocasting float32 weights at every call;
    images are cast to ``dtype`` before the gather, any surrounding autocast is switched off for
    the teacher, and window maps are stitched in float32. ``encode_text``, ``mean`` and ``std``
    keep using the original backbone (the text tower stays in its own dtype).

    Window batches. ``batch_size`` is a cap. On CUDA, the first time a window shape is seen, a few
    windows run eagerly while the peak of allocated memory is measured (this resets the device's
    peak statistics); each call then runs ``min(cap, 0.8 * free memory // bytes per window)``
    windows at a time (:func:`window_batch_size`), a size that for a window shape only ever
    shrinks. On CPU the cap is used.

    Compilation. ``compile`` wraps the window forward in ``torch.compile(mode=..., dynamic=False)``
    (``True``: the default mode; ``"reduce-overhead"`` also captures CUDA graphs on a GPU;
    ``"max-autotune"`` searches kernels, slow to compile). The last chunk of windows is then padded
    to the chunk size with copies of its last window, whose outputs are dropped, so each window
    shape compiles once. The memory-measuring windows and images no larger than the window (one
    forward of the whole batch, at any size) run eagerly.

    Args:
        backbone: any module with the dense-backbone contract (duck typing).
        window: window size (int or (h, w)); defaults to ``backbone.native_size``. Must be a
            multiple of the patch size.
        stride: step between windows in pixels (int or (sy, sx)); need not be a multiple of the
            patch size, and must not exceed the window, so that every pixel is covered.
            Defaults: :class:`TeacherSettings`.
        batch_size: the cap on windows per forward (fewer on CUDA when memory is short).
        dtype: floating dtype of the window weights; ``None``: the backbone as it is.
        compile: ``False``, ``True``, ``"reduce-overhead"`` or ``"max-autotune"``.
        copy_backbone: with ``dtype``, ``False`` converts ``backbone`` itself in place instead of
            copying it (saves memory when nothing else uses it, e.g. training's frozen copy; its
            text tower is then in ``dtype`` too).
    """

    def __init__(
        self,
        backbone: nn.Module,
        window: int | tuple[int, int] | None = TeacherSettings.window,
        stride: int | tuple[int, int] = TeacherSettings.stride,
        batch_size: int = TeacherSettings.batch_size,
        dtype: torch.dtype | None = None,
        compile: bool | str = TeacherSettings.compile,
        copy_backbone: bool = True,
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
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        check_compile_setting(compile)
        self.batch_size = batch_size
        self.dtype = dtype
        self.window_copy = low_precision_copy(backbone, dtype, copy_backbone)
        self.compile_mode = compile
        self._compiled = None
        if compile:
            self._compiled = torch.compile(
                self.window_model.forward, mode=compile_mode(compile), dynamic=False
            )
        self._window_bytes: dict[tuple[int, int], int] = {}
        self._chunk_sizes: dict[tuple[int, int], int] = {}

    @property
    def window_model(self) -> nn.Module:
        """The module that runs the windows: the ``dtype`` copy, or the backbone itself."""
        return self.backbone if self.window_copy is None else self.window_copy

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
        if self.dtype is not None:
            images = images.to(self.dtype)
        images = pad_to_patch_multiple(images, self.patch_size)
        with self._precision(images.device):
            if len(layout.origins) == 1:
                return self.window_model(images).float()
            canvas = self._accumulate(images, layout)
        counts = layout.coverage(canvas.device).to(canvas.dtype)
        canvas = canvas / counts
        grid = (layout.image_size[0] // self.patch_size, layout.image_size[1] // self.patch_size)
        if tuple(canvas.shape[-2:]) != grid:
            canvas = F.interpolate(canvas, size=grid, mode="bilinear", align_corners=False)
        return canvas

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast off while a ``dtype`` teacher runs (its weights are cast already)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, enabled=False)

    def _accumulate(self, images: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Sum of upsampled window maps on the cell canvas, (B, C, rows, cols) in float32.

        Windows of all images form one job list; each chunk of jobs is cut out with one gather,
        run through the window model, and scattered into the canvas with one ``index_add_`` (no
        Python loop over windows).
        """
        batch, device = images.shape[0], images.device
        rows, cols = layout.canvas_size
        jobs = WindowJobs.plan(batch, layout, device)
        order = torch.arange(len(jobs), device=device)
        canvas = torch.zeros(
            batch * rows * cols, self.embed_dim, dtype=torch.float32, device=device
        )
        done = self._measure_windows(canvas, images, jobs, order)
        size = self._chunk_size(layout.window, device)
        forward = self._compiled or self.window_model
        for start in range(done, len(jobs), size):
            chunk = order[start : start + size]
            padded = size if self._compiled else len(chunk)
            self._add_windows(canvas, images, jobs, chunk, forward, padded)
        return canvas.view(batch, rows, cols, -1).permute(0, 3, 1, 2)

    def _add_windows(
        self,
        canvas: torch.Tensor,
        images: torch.Tensor,
        jobs: WindowJobs,
        chunk: torch.Tensor,
        forward: Callable[[torch.Tensor], torch.Tensor],
        padded: int,
    ) -> None:
        """Run the (n,) jobs ``chunk`` (padded to ``padded`` windows with copies of the last one,
        whose maps are dropped) and add their upsampled maps into the (B * cells, C) canvas."""
        crops = jobs.crops(images, pad_with_last(chunk, padded))
        features = forward(crops)[: len(chunk)].float()
        if jobs.layout.factor != (1, 1):
            features = F.interpolate(
                features, size=jobs.layout.window_cells, mode="bilinear", align_corners=False
            )
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        canvas.index_add_(0, jobs.targets(chunk).flatten(), flat)

    def _measure_windows(
        self, canvas: torch.Tensor, images: torch.Tensor, jobs: WindowJobs, order: torch.Tensor
    ) -> int:
        """On CUDA, for a window shape not seen yet: run the first few jobs eagerly, record the
        peak bytes per window, and return how many jobs ran (0 when nothing was measured)."""
        window = jobs.layout.window
        if images.device.type != "cuda" or window in self._window_bytes:
            return 0
        count = min(PROBE_WINDOWS, self.batch_size, len(jobs))

        def first_jobs() -> None:
            self._add_windows(canvas, images, jobs, order[:count], self.window_model, count)

        self._window_bytes[window] = math.ceil(cuda_peak_bytes(first_jobs, images.device) / count)
        return count

    def _chunk_size(self, window: tuple[int, int], device: torch.device) -> int:
        """Windows per forward: the cap on CPU; on CUDA what free memory allows (at most the cap),
        never more than an earlier call gave this window shape."""
        if device.type != "cuda":
            return self.batch_size
        fits = window_batch_size(
            self.batch_size, cuda_free_bytes(device), self._window_bytes[window]
        )
        self._chunk_sizes[window] = min(fits, self._chunk_sizes.get(window, fits))
        return self._chunk_sizes[window]
