"""Resampling of learned absolute position embeddings to an image's patch grid.

Both conventions interpolate bicubically *without* antialiasing, which is how the paper's
released checkpoints were trained (timm's ``resample_abs_pos_embed`` antialiases unless told
not to). When the target grid equals the source grid the embedding is returned unchanged, so a
native-size image sees exactly the pretrained embedding.

``F.interpolate(mode="bicubic", align_corners=False)`` is a separable linear map: along each
axis a (target, source) matrix whose rows hold four cubic-convolution weights. Here the grid is
resampled as ``Mh @ grid @ Mw^T`` per channel with cached float64 matrices (two small matmuls
instead of ``upsample_bicubic2d``, half the GPU time of a single pass on an H100), and
:class:`ResampledPositions` keeps the resampled table of a frozen embedding, so a forward at a
size seen before does no resampling at all.

Under ``torch.export`` (the ONNX export of :mod:`spar.export`) the target grid is symbolic, so
the matrices are built from it with tensor operations instead (:func:`traced_bicubic_matrix`,
the same float64 arithmetic): the exported graph resamples for whatever size it is given.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch

# The DINO convention: a small offset added to the target grid before computing the scale factor,
# so that floor(source * scale) lands on the target despite floating-point error.
DINO_SCALE_OFFSET = 0.1
# PyTorch's bicubic kernel (aten/src/ATen/native/UpSample.h), the coefficient of Keys' cubic.
CUBIC_A = -0.75

Grid = tuple[int, int]
Resample = Callable[[torch.Tensor, Grid, Grid], torch.Tensor]


def _check_grid(grid_tokens: torch.Tensor, source_grid: Grid) -> None:
    gh, gw = source_grid
    if grid_tokens.shape[0] != gh * gw:
        raise ValueError(
            f"position embedding has {grid_tokens.shape[0]} grid tokens, "
            f"expected {gh}x{gw}={gh * gw}"
        )


def cubic_weights(frac: float) -> tuple[float, float, float, float]:
    """Weights of the taps at offsets -1, 0, 1, 2 from ``floor(x)``, ``frac = x - floor(x)``."""

    def near(d: float) -> float:  # |d| <= 1
        return ((CUBIC_A + 2) * d - (CUBIC_A + 3)) * d * d + 1

    def far(d: float) -> float:  # 1 < |d| < 2
        return ((CUBIC_A * d - 5 * CUBIC_A) * d + 8 * CUBIC_A) * d - 4 * CUBIC_A

    return far(frac + 1), near(frac), near(1 - frac), far(2 - frac)


def bicubic_rows(source: int, target: int, step: float) -> list[list[float]]:
    """The (target, source) weights ``upsample_bicubic2d`` applies along one axis.

    Output ``i`` reads source coordinate ``x = step * (i + 0.5) - 0.5``, where ``step`` is the
    inverse scale (``source / target`` when resampling to a size); taps outside the axis read
    its border, as PyTorch clamps the index (``guard_index_and_lambda`` and the bounded reads of
    ``UpSample.h``). In double precision: PyTorch's kernel, with float32 coordinates, differs
    from these weights by float32 rounding.
    """
    rows = []
    for i in range(target):
        x = step * (i + 0.5) - 0.5
        index = min(math.floor(x), source - 1)
        frac = min(max(x - index, 0.0), 1.0)
        row = [0.0] * source
        for offset, weight in enumerate(cubic_weights(frac), start=-1):
            row[min(max(index + offset, 0), source - 1)] += weight
        rows.append(row)
    return rows


def bicubic_matrix(source: int, target: int, step: float, device: torch.device) -> torch.Tensor:
    """(target, source) float64 bicubic resampling matrix of one axis (:func:`bicubic_rows`)."""
    return torch.tensor(bicubic_rows(source, target, step), dtype=torch.float64, device=device)


_cached_bicubic_matrix = functools.lru_cache(maxsize=256)(bicubic_matrix)


def interpolation_matrix(
    source: int, target: int, step: float, device: torch.device
) -> torch.Tensor:
    """:func:`bicubic_matrix`, cached; built in the graph, a constant, under ``torch.compile``
    (which would trace through the cache and warn)."""
    if torch.compiler.is_compiling():
        return bicubic_matrix(source, target, step, device)
    return _cached_bicubic_matrix(source, target, step, device)


def traced_length(size: int | torch.SymInt, device: torch.device) -> torch.Tensor:
    """A (possibly symbolic) size as a (1,) float64 tensor: no Python arithmetic on a symbolic
    size. A reduction, as a slice's length would be an expression torch.export cannot simplify
    to 1."""
    return torch.arange(size, dtype=torch.float64, device=device).amax(0, keepdim=True) + 1


def traced_bicubic_matrix(
    source: int, target: int | torch.SymInt, step: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(target, source) float64 :func:`bicubic_rows` from tensor operations, for a symbolic
    ``target`` (``torch.export``); ``step`` is the (1,) float64 inverse scale. The arithmetic is
    :func:`bicubic_rows`' in the same order, so the weights are the same doubles."""
    outputs = torch.arange(target, dtype=torch.float64, device=device)
    x = step * (outputs + 0.5) - 0.5
    index = torch.floor(x).clamp(max=source - 1)
    frac = (x - index).clamp(0.0, 1.0)
    columns = torch.arange(source, dtype=torch.float64, device=device)
    a = CUBIC_A

    def near(d: torch.Tensor) -> torch.Tensor:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: torch.Tensor) -> torch.Tensor:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = (far(frac + 1), near(frac), near(1 - frac), far(2 - frac))
    matrix = torch.zeros_like(x)[:, None] * columns  # (target, source) zeros
    for offset, weight in enumerate(weights, start=-1):
        tap = (index + offset).clamp(0, source - 1)
        matrix = matrix + weight[:, None] * (tap[:, None] == columns).to(torch.float64)
    return matrix


def _traced_resample(
    grid_tokens: torch.Tensor, source_grid: Grid, target_grid: Grid, by_scale: bool
) -> torch.Tensor:
    """:func:`resample_pos_embed_by_scale` (``by_scale``) or :func:`resample_pos_embed_to_size`
    with :func:`traced_bicubic_matrix` matrices; shapes as there."""
    _check_grid(grid_tokens, source_grid)
    device = grid_tokens.device
    lengths = [traced_length(t, device) for t in target_grid]
    if by_scale:
        # The eager path returns the table unchanged when both sides equal the source's: then
        # every step is 1 (identity rows), not 1 / ((n + 0.1) / n).
        same = (lengths[0] == source_grid[0]) & (lengths[1] == source_grid[1])
        steps = [
            torch.where(same, 1.0, 1.0 / ((n + DINO_SCALE_OFFSET) / s))
            for n, s in zip(lengths, source_grid, strict=True)
        ]
    else:
        steps = [s / n for n, s in zip(lengths, source_grid, strict=True)]
    rows, cols = (
        traced_bicubic_matrix(s, t, step, device)
        for s, t, step in zip(source_grid, target_grid, steps, strict=True)
    )
    grid = grid_tokens.to(torch.float64).unflatten(0, source_grid).permute(2, 0, 1)
    grid = rows @ grid @ cols.T  # (C, th, tw)
    return grid.permute(1, 2, 0).flatten(0, 1).to(grid_tokens.dtype)


def resample_grid(
    grid_tokens: torch.Tensor, source_grid: Grid, target_grid: Grid, steps: tuple[float, float]
) -> torch.Tensor:
    """Bicubic resampling as two matrix products in float64, cast back.

    float64 keeps the products exact to the table's rounding whatever the float32 matmul
    precision (the scripts let float32 matmuls use TF32) and out of autocast, which leaves
    float64 alone; the grid is small and, when frozen, resampled once per size.

    Args:
        grid_tokens: (gh * gw, C) position embeddings of the patch grid (no class token).
        source_grid: (gh, gw) of ``grid_tokens``.
        target_grid: (th, tw) wanted.
        steps: inverse scale of each axis, see :func:`bicubic_rows`.
    Returns:
        (th * tw, C) embeddings in ``grid_tokens.dtype``; differentiable.
    """
    _check_grid(grid_tokens, source_grid)
    rows, cols = (
        interpolation_matrix(s, t, step, grid_tokens.device)
        for s, t, step in zip(source_grid, target_grid, steps, strict=True)
    )
    grid = grid_tokens.to(torch.float64).unflatten(0, source_grid)
    grid = torch.einsum("hs,swc->hwc", rows, grid)
    grid = torch.einsum("wv,hvc->hwc", cols, grid)
    return grid.flatten(0, 1).to(grid_tokens.dtype)


def resample_pos_embed_by_scale(
    grid_tokens: torch.Tensor, source_grid: Grid, target_grid: Grid
) -> torch.Tensor:
    """Resample by scale factor ``(target + 0.1) / source`` per axis (DINO / MaskCLIP convention).

    With an explicit scale factor ``F.interpolate`` maps output pixel ``i`` to input coordinate
    ``(i + 0.5) / scale - 0.5``, which differs slightly from resampling to a target size; the
    released MaskCLIP-SPAR checkpoints were trained with this mapping.

    Args:
        grid_tokens: (gh * gw, C) position embeddings of the patch grid (no class token).
        source_grid: (gh, gw) of ``grid_tokens``.
        target_grid: (th, tw) wanted.
    Returns:
        (th * tw, C) embeddings.
    """
    if torch.compiler.is_exporting():
        return _traced_resample(grid_tokens, source_grid, target_grid, by_scale=True)
    if tuple(target_grid) == tuple(source_grid):
        return grid_tokens
    steps = tuple(
        1.0 / ((t + DINO_SCALE_OFFSET) / s) for t, s in zip(target_grid, source_grid, strict=True)
    )
    return resample_grid(grid_tokens, source_grid, target_grid, steps)


def resample_pos_embed_to_size(
    grid_tokens: torch.Tensor, source_grid: Grid, target_grid: Grid
) -> torch.Tensor:
    """Resample to an explicit target size (SigLIP2 convention: what timm's
    ``resample_abs_pos_embed`` computes without antialiasing); shapes as in
    :func:`resample_pos_embed_by_scale`."""
    if torch.compiler.is_exporting():
        return _traced_resample(grid_tokens, source_grid, target_grid, by_scale=False)
    if tuple(target_grid) == tuple(source_grid):
        return grid_tokens
    steps = tuple(s / t for t, s in zip(target_grid, source_grid, strict=True))
    return resample_grid(grid_tokens, source_grid, target_grid, steps)


class ResampledPositions:
    """A learned position table resampled to any grid, kept per grid while the table is frozen.

    Tables are kept per (target grid, dtype) for the current weights: the cache is emptied at
    the next call after the embedding's storage or its version counter changes (an in-place
    update, ``load_state_dict``, ``.to()``). Edits through ``.data`` bypass the version counter
    and are not seen. An embedding that requires grad, with grad enabled, is resampled at every
    call (differentiably), as it is under ``torch.compile``; one made in inference mode (no
    version counter) at every call too.

    Args:
        resample: one of the conventions above.
        num_prefix_tokens: leading tokens (a class token) that are kept as they are.
        max_tables: how many tables to keep; the least recently used goes first.
    """

    def __init__(self, resample: Resample, num_prefix_tokens: int = 0, max_tables: int = 8):
        self.resample = resample
        self.num_prefix_tokens = num_prefix_tokens
        self.max_tables = max_tables
        self._source: torch.Tensor | None = None  # holds the storage, so its address is not reused
        self._version = -1
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __call__(
        self, table: torch.Tensor, source_grid: Grid, target_grid: Grid, dtype: torch.dtype
    ) -> torch.Tensor:
        """(P + gh * gw, D) table -> (P + th * tw, D) in ``dtype``, P prefix tokens."""
        if not self._cacheable(table):
            return self._compute(table, source_grid, target_grid, dtype)
        if not self._is_current(table):
            self._tables.clear()
            self._source, self._version = table.detach(), table._version
        key = (tuple(target_grid), dtype)
        if key in self._tables:
            self._tables.move_to_end(key)
        else:
            self._tables[key] = self._compute(table, source_grid, target_grid, dtype)
            if len(self._tables) > self.max_tables:
                self._tables.popitem(last=False)
        return self._tables[key]

    def _compute(
        self, table: torch.Tensor, source_grid: Grid, target_grid: Grid, dtype: torch.dtype
    ) -> torch.Tensor:
        prefix, grid = table[: self.num_prefix_tokens], table[self.num_prefix_tokens :]
        grid = self.resample(grid, source_grid, target_grid)
        if self.num_prefix_tokens:
            grid = torch.cat([prefix, grid])
        return grid.to(dtype)

    @staticmethod
    def _cacheable(table: torch.Tensor) -> bool:
        """False when the result must carry a graph, or under tracing (no version counter)."""
        return not (
            torch.compiler.is_compiling()
            or (table.requires_grad and torch.is_grad_enabled())
            or table.is_inference()
        )

    def _is_current(self, table: torch.Tensor) -> bool:
        source = self._source
        return (
            source is not None
            and source.device == table.device
            and source.data_ptr() == table.data_ptr()
            and (source.dtype, source.shape) == (table.dtype, table.shape)
            and self._version == table._version
        )
