"""Resampling of learned absolute position embeddings to an image's patch grid.

Both conventions interpolate bicubically *without* antialiasing, which is how the paper's
released checkpoints were trained (timm's ``resample_abs_pos_embed`` antialiases unless told
not to). When the target grid equals the source grid the embedding is returned unchanged, so a
native-size image sees exactly the pretrained embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

# The DINO convention: a small offset added to the target grid before computing the scale factor,
# so that floor(source * scale) lands on the target despite floating-point error.
DINO_SCALE_OFFSET = 0.1


def _check_grid(grid_tokens: torch.Tensor, source_grid: tuple[int, int]) -> None:
    gh, gw = source_grid
    if grid_tokens.shape[0] != gh * gw:
        raise ValueError(
            f"position embedding has {grid_tokens.shape[0]} grid tokens, "
            f"expected {gh}x{gw}={gh * gw}"
        )


def resample_pos_embed_by_scale(
    grid_tokens: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample by scale factor ``(target + 0.1) / source`` per axis (DINO / MaskCLIP convention).

    With an explicit scale factor ``F.interpolate`` maps output pixel ``i`` to input coordinate
    ``(i + 0.5) / scale - 0.5``, which differs slightly from resampling to a target size; the
    released MaskCLIP-SPAR checkpoints were trained with this mapping. timm's
    ``resample_abs_pos_embed`` only resamples to a size, so this one calls ``F.interpolate``.

    Args:
        grid_tokens: (gh * gw, C) position embeddings of the patch grid (no class token).
        source_grid: (gh, gw) of ``grid_tokens``.
        target_grid: (th, tw) wanted.
    Returns:
        (th * tw, C) embeddings.
    """
    if tuple(target_grid) == tuple(source_grid):
        return grid_tokens
    _check_grid(grid_tokens, source_grid)
    scale = tuple(
        (t + DINO_SCALE_OFFSET) / s for t, s in zip(target_grid, source_grid, strict=True)
    )
    grid = grid_tokens.float().reshape(1, *source_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False
    )
    if tuple(grid.shape[-2:]) != tuple(target_grid):
        raise RuntimeError(f"resampling gave a {tuple(grid.shape[-2:])} grid, not {target_grid}")
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(grid_tokens.dtype)


def resample_pos_embed_to_size(
    grid_tokens: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample to an explicit target size (SigLIP2 convention): timm's resampler, without
    antialiasing; shapes as in :func:`resample_pos_embed_by_scale`."""
    if tuple(target_grid) == tuple(source_grid):
        return grid_tokens
    _check_grid(grid_tokens, source_grid)
    resampled = resample_abs_pos_embed(
        grid_tokens[None],
        new_size=list(target_grid),
        old_size=list(source_grid),
        num_prefix_tokens=0,
        interpolation="bicubic",
        antialias=False,
    )
    return resampled[0]
