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
r = 1 and this is plain averaging on the patch grid. Follows naomikombol/SPAR
(segmentors/segmentor_vit.py, ``compute_upsample_factor``, ``fold_from_patches``; commit
0f63ff2697096b802153666d6c741203c3c1d491), which takes one square stride; here r, c and the
offsets are computed per axis from (sy, sx), e.g. stride (32, 24) at p = 16 gives r = (1, 2)
and cells of 16 x 8 pixels.

Efficiency. A low-precision teacher runs its own copy of the weights in that dtype (no casts at
every call), window batches are capped by ``batch_size`` and sized from free memory on CUDA, and
the window forward can be compiled; see :class:`SlidingWindowTeacher`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from ..utils import autocast_dtype, module_device
from .base import check_images, pad_to_patch_multiple
from .compiling import check_compile_setting, compile_mode

FREE_MEMORY_FRACTION = 0.8  # of the free CUDA memory that window batches may take
PROBE_WINDOWS = 4  # windows run to measure the memory of one window (CUDA)


@dataclass
class TeacherSettings:
    """The ``configs/teacher`` node (the structured config :mod:`spar.configs` registers as
    ``schema/teacher``) and the one place the teacher's defaults are written.

    Types are loose where several forms are accepted (``stride: 24`` or ``[24, 32]``, ``compile:
    false`` or a mode name): :func:`check_teacher_settings` gives the one-line errors.

    Attributes:
        window: window side or (h, w) in pixels; ``None``: the backbone's native size.
        stride: pixels between windows, an int or (sy, sx); at most the window.
        batch_size: the cap on windows per forward (fewer on CUDA when free memory is short).
        compile: ``torch.compile`` the window forward: ``False``, ``True``,
            ``"reduce-overhead"`` or ``"max-autotune"``.
    """

    window: Any = None
    stride: Any = 24
    batch_size: int = 32
    compile: Any = False


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    # Any sequence (a Hydra ListConfig from `teacher.stride=[24,32]` too), but not a string.
    if isinstance(value, Sequence | ListConfig) and not isinstance(value, str | bytes):
        pair = tuple(value)
    else:
        pair = (value, value)
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


def window_batch_size(
    cap: int, free_bytes: int, bytes_per_window: int, fraction: float = FREE_MEMORY_FRACTION
) -> int:
    """Windows per forward: ``min(cap, fraction * free_bytes // bytes_per_window)``, at least 1.

    The teacher's rule on CUDA, where ``free_bytes`` is what the card can still give and
    ``bytes_per_window`` the measured peak of one window (gather, forward, upsampling, scatter);
    ``fraction`` leaves room for fragmentation and for whatever else runs. On CPU the cap is used.
    """
    fits = int(free_bytes * fraction) // max(bytes_per_window, 1)
    return max(1, min(cap, fits))


def pad_with_last(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(n,) -> (size,): ``ids`` then copies of its last entry (``ids`` itself when n = size)."""
    if len(ids) == size:
        return ids
    return torch.cat([ids, ids[-1:].expand(size - len(ids))])


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes a CUDA ``device`` can still allocate: free on the card plus what torch's caching
    allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def cuda_peak_bytes(function: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA bytes that ``function()`` allocates on top of what was allocated before it.

    Resets the device's peak statistics (``torch.cuda.max_memory_allocated``). The allocator
    counts on the host, when work is queued, so no synchronisation is needed.
    """
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    return torch.cuda.max_memory_allocated(device) - before


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


#: The keys of a ``configs/teacher`` node that :func:`build_teacher` reads.
TEACHER_SETTINGS = tuple(field.name for field in fields(TeacherSettings))


def check_teacher_settings(
    settings: Mapping[str, Any] | None, backbone: str, key: str = "teacher"
) -> None:
    """Check a ``configs/teacher`` node for backbone ``backbone`` (a registered name) before any
    model is built: ``stride`` and ``window`` are positive ints or pairs, the stride is at most
    the window (``window: null`` is the backbone's native size), ``batch_size`` a positive int
    and ``compile`` a compile setting.

    Raises:
        SettingError: one line naming the key and the value, e.g. ``teacher.stride [500, 500]
            is larger than teacher.window [224, 224] (the maskclip backbone's native size)``.
    """
    from ..config import SettingError, require_int
    from .registry import backbone_entry

    settings = settings or {}
    try:
        stride = _pair(settings.get("stride", TeacherSettings.stride), f"{key}.stride")
        window_value = settings.get("window", TeacherSettings.window)
        if window_value is None:
            native = backbone_entry(backbone).config.native_size
            window, where = (native, native), f" (the {backbone} backbone's native size)"
        else:
            window, where = _pair(window_value, f"{key}.window"), ""
    except ValueError as error:
        raise SettingError(str(error)) from None
    if stride[0] > window[0] or stride[1] > window[1]:
        raise SettingError(
            f"{key}.stride {list(stride)} is larger than {key}.window {list(window)}{where}: "
            "pixels between windows would be left uncovered; use a stride of at most the window"
        )
    require_int(f"{key}.batch_size", settings.get("batch_size", TeacherSettings.batch_size), 1)
    check_compile_setting(settings.get("compile", TeacherSettings.compile), f"{key}.compile")


def build_teacher(
    backbone: nn.Module,
    settings: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    copy_backbone: bool = True,
) -> SlidingWindowTeacher:
    """The sliding-window teacher that a ``configs/teacher`` node describes.

    The one place that turns configuration into a teacher (training, evaluation, the
    single-image tools, the demo and the speed benchmark all call it).

    Args:
        backbone: the frozen backbone the teacher runs, on the device it will run on.
        settings: ``window`` (``None``: the backbone's native size), ``stride``, ``batch_size``
            (the cap on windows per forward) and ``compile``; other keys (e.g. the training
            cache's) are not the teacher's and are ignored. Missing keys take
            :class:`TeacherSettings`'s defaults.
        precision: ``fp32`` (the backbone as it is), ``bf16``, ``fp16`` or ``auto`` (bf16 on a
            CUDA device that supports it), resolved on the backbone's device by
            :func:`spar.utils.autocast_dtype`; a low precision gives the teacher a copy of the
            backbone in that dtype.
        copy_backbone: ``False`` converts ``backbone`` in place instead (see
            :class:`SlidingWindowTeacher`).
    """
    settings = settings or {}
    return SlidingWindowTeacher(
        backbone,
        **{k: settings[k] for k in TEACHER_SETTINGS if k in settings},
        dtype=autocast_dtype(precision, module_device(backbone)),
        copy_backbone=copy_backbone,
    )


FEATURE_SOURCES = ("student", "teacher")


def check_feature_source(features: str) -> None:
    """Raise ``ValueError`` unless ``features`` is one of :data:`FEATURE_SOURCES` (callers check
    before loading a model, so a typo fails at once)."""
    if features not in FEATURE_SOURCES:
        raise ValueError(f"features must be one of {FEATURE_SOURCES}, got {features!r}")


def dense_features(
    backbone: nn.Module,
    features: str,
    teacher_settings: Mapping[str, Any] | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """The dense-feature source a ``features`` setting names: ``"student"``, the backbone's
    single pass; ``"teacher"``, :func:`build_teacher` of it (``teacher_settings``,
    ``precision``)."""
    check_feature_source(features)
    if features == "student":
        return backbone
    return build_teacher(backbone, teacher_settings, precision)
