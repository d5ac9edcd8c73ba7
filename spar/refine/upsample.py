"""Feature upsampling stages: the segmenter's ``upsample=anyup`` (``bilinear`` is the
segmenter's own path and needs no module)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..imaging import to_model_input
from ..utils import autocast_dtype
from .anyup import IMAGENET_MEAN, IMAGENET_STD, AnyUp


class AnyUpUpsampler(nn.Module):
    """Runs :class:`~spar.refine.anyup.AnyUp` on pixels in [0, 1] and a backbone's grid.

    The grid of a backbone covers its bottom/right padding to a multiple of the patch size, so
    the image is padded the same way, upsampled at the padded size and cropped back.

    Args:
        model: the AnyUp network (released weights loaded).
        precision: autocast of the encoders and attention logits (``auto``: bf16 on CUDA,
            float32 on CPU; ``fp32`` switches off a caller's autocast); the softmax and the mix
            of values are float32.
    """

    def __init__(self, model: AnyUp, precision: str = "auto") -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.precision = precision

    def forward(
        self,
        pixels: torch.Tensor,
        features: torch.Tensor,
        values: torch.Tensor | None = None,
        patch_size: int | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1], features (B, C, h, w), optional values (B, V, h, w)
        -> (B, V', H, W) float32 (V' = V, or what ``project`` makes of the mixed values)."""
        height, width = pixels.shape[-2:]
        rows, cols = features.shape[-2:]
        padded = (rows * patch_size, cols * patch_size) if patch_size else (height, width)
        image = to_model_input(pixels.float(), IMAGENET_MEAN, IMAGENET_STD)
        image = F.pad(image, (0, padded[1] - width, 0, padded[0] - height))
        dtype = autocast_dtype(self.precision, pixels.device)
        precision = (
            torch.autocast(pixels.device.type, dtype=dtype)
            if dtype is not None
            else torch.autocast(pixels.device.type, enabled=False)  # also inside a caller's
        )
        with precision:
            out = self.model(image, features, padded, values=values, project=project)
        return out[..., :height, :width]
