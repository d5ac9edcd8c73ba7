"""Resampling of learned absolute position embeddings to an image's patch grid.

Both functions use bicubic interpolation *without* antialiasing, which is how the paper's
released checkpoints were trained; timm's ``resample_abs_pos_embed`` antialiases by default, so it
is deliberately not used here. When the target grid equals the source grid the embedding is
returned unchanged, so a native-size image sees exactly the pretrained embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The DINO convention: a small offset added to the target grid before computing the scale factor,
# so that floor(source * scale) lands on the target despite floating-point error.
DINO_SCALE_OFFSET = 0.1


def _resample_bicubic(
    grid_tokens: torch.Tensor,
    source_grid: tuple[int, int],
    target_grid: tuple[int, int],
    **interpolate_kwargs,
) -> torch.Tensor:
    """(gh * gw, C) -> (th * tw, C), bicubic without antialiasing; unchanged if the grids match.

    ``interpolate_kwargs`` carries either ``size`` or ``scale_factor`` to ``F.interpolate``.
    """
    if tuple(target_grid) == tuple(source_grid):
        return grid_tokens
    gh, gw = source_grid
    if grid_tokens.shape[0] != gh * gw:
        raise ValueError(
            f"position embedding has {grid_tokens.shape[0]} grid tokens, "
            f"expected {gh}x{gw}={gh * gw}"
        )
    grid = grid_tokens.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, mode="bicubic", align_corners=False, antialias=False, **interpolate_kwargs
    )
    if tuple(grid.shape[-2:]) != tuple(target_grid):
        raise RuntimeError(f"resampling gave a {tuple(grid.shape[-2:])} grid, not {target_grid}")
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(grid_tokens.dtype)


def resample_pos_embed_by_scale(
    grid_tokens: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
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
    scale = tuple(
        (t + DINO_SCALE_OFFSET) / s for t, s in zip(target_grid, source_grid, strict=True)
    )
    return _resample_bicubic(grid_tokens, source_grid, target_grid, scale_factor=scale)


def resample_pos_embed_to_size(
    grid_tokens: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample to an explicit target size (SigLIP2 convention); shapes as above."""
    return _resample_bicubic(grid_tokens, source_grid, target_grid, size=tuple(target_grid))
