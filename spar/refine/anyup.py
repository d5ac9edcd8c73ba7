"""AnyUp: a feature-agnostic learned upsampler (Wimmer et al., 2025), rebuilt in plain torch.

The modules carry the parameter names of the authors' release, so that its weight file
(``anyup_multi_backbone.pth``, trained on DINOv2, CLIP, SigLIP and ViT-B features) loads
strictly. What it computes, for an image (B, 3, H, W) and features (B, C, h, w) of any C:

- an image encoder (a 1x1 convolution and two residual blocks, 128 channels) on the image,
  with a rotary position embedding of the pixel coordinates;
- queries: a query encoder on it, average-pooled to the output size, then a 3x3 convolution;
- keys: a key encoder on it, pooled to (h, w), concatenated with the "feature unification" of
  the L2-normalised features (128 learned 5x5 basis kernels convolved with every channel, a
  softmax over groups of those responses laid out as in the authors' code, averaged; any C
  in, 128 out; see ``_FeatureUnification``), aggregated;
- windowed cross-attention (4 heads, RMS-normalised queries and keys, each query sees the keys
  within ``window_ratio`` = 0.1 of the image extent around it); the head-averaged attention
  weights mix the *input* features, so every output vector is a convex combination of input
  vectors and stays in the input's (text-aligned) space.

Memory is bounded by attending in bands of output rows (``chunk_size`` queries at a time),
each against only the key rows its windows reach; the result equals full masked attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QK_DIM = 128
NUM_HEADS = 4
WINDOW_RATIO = 0.1
BASIS_KERNEL = 5
ROPE_THETA = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The authors' release of the multi-backbone weights (the ``anyup_multi_backbone`` hub entry).
RELEASE_URL = (
    "https://github.com/wimmerth/anyup/releases/download/checkpoint_v2/anyup_multi_backbone.pth"
)
#: The ``weights`` setting of the refinement stages that names their published weights.
HUB = "hub"


@dataclass
class AnyUpSettings:
    """The ``configs/upsample/anyup`` node (the structured config :mod:`spar.configs`
    registers as ``schema/anyup``) and the one place AnyUp's defaults are written.

    Attributes:
        name: the stage (``spar.refine.UPSAMPLE_NAMES``).
        weights: ``hub`` (the authors' released weights, torch hub cache), a local file, or
            ``None`` (random weights: timing only).
        chunk_size: output pixels attended at a time (bounds the attention memory).
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
    """

    name: str = "anyup"
    weights: Any = HUB
    chunk_size: int = 16384
    precision: str = "auto"


class _ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (``block.0..5``; 1x1 convolutions)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 1, bias=False),
        )
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


class _FeatureUnification(nn.Module):
    """Any number of channels -> ``bases`` channels: (B, C, h, w) -> (B, bases, h, w).

    Every channel is convolved (zero padding, divided by the number of pixels inside the image)
    with each basis kernel, which gives C x bases responses in channel-major order: flat index
    ``f = c * bases + m`` is channel c convolved with basis m. As in the authors' code (the code
    the released weights were trained with: wimmerth/anyup ``anyup/layers/feature_unification.py``,
    ``LearnedFeatureUnification.forward``, commit 351807a9c4287368732cc247f26c7c81c9139af4),
    those responses are then read as a (bases, C) grid, ``f = p * C + q``: output channel p is
    the softmax over p of each column q, averaged over the C columns. A column q gathers the
    responses f = q, q + C, q + 2C, ..., so a softmax mixes channels and bases (the paper
    describes a softmax over the bases of one channel; the checkpoints follow the code).

    Columns are processed ``channel_chunk`` at a time: each chunk convolves only the
    (channel, basis) pairs its columns need, so the temporary is (B, bases, chunk, h, w)
    and every pair is computed once over all chunks, as in the unchunked code.
    """

    def __init__(
        self, bases: int = QK_DIM, kernel: int = BASIS_KERNEL, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(bases, 1, kernel, kernel, device=device))

    def forward(self, features: torch.Tensor, channel_chunk: int = 64) -> torch.Tensor:
        """(B, C, h, w) -> (B, bases, h, w)."""
        batch, channels, height, width = features.shape
        bases, _, kernel, _ = self.basis.shape
        pad = kernel // 2
        padded = F.pad(features, (pad,) * 4)
        ones = features.new_ones(1, 1, height, width)
        inside = F.conv2d(F.pad(ones, (pad,) * 4), features.new_ones(1, 1, kernel, kernel))
        rows = torch.arange(bases, device=features.device)[:, None]  # p
        total = 0
        for start in range(0, channels, channel_chunk):
            columns = torch.arange(start, min(start + channel_chunk, channels), device=rows.device)
            flat = (rows * channels + columns).flatten()  # (bases * chunk,) in (p, q) order
            channel, basis = flat // bases, flat % bases
            responses = F.conv2d(padded[:, channel], self.basis[basis], groups=flat.numel())
            responses = (responses / inside).view(batch, bases, columns.numel(), height, width)
            total = total + responses.softmax(dim=1).sum(dim=2)
        return total / channels


class _RotaryEmbedding(nn.Module):
    """2-D rotary embedding of pixel coordinates in [0, 1]; ``freqs`` (2, dim): the first half
    of the channels rotate with the row, the second half with the column."""

    def __init__(
        self, dim: int = QK_DIM, theta: float = ROPE_THETA, device: torch.device | None = None
    ) -> None:
        super().__init__()
        quarter = theta ** torch.linspace(0, -1, dim // 4, device=device)
        pairs = torch.cat([quarter, quarter])
        freqs = torch.zeros(2, dim, device=device)
        freqs[0, : dim // 2] = pairs
        freqs[1, dim // 2 :] = pairs
        self.freqs = nn.Parameter(freqs * 2 * math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> same, rotated by the angle of every pixel (computed in float32)."""
        height, width = x.shape[-2:]
        rows = torch.linspace(0, 1, height, device=x.device)
        cols = torch.linspace(0, 1, width, device=x.device)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
        angle = (coords @ self.freqs.float()).permute(2, 0, 1)  # (D, H, W)
        first, second = x.float().chunk(2, dim=1)
        rotated = torch.cat([-second, first], dim=1)
        return (x.float() * angle.cos() + rotated * angle.sin()).to(x.dtype)


class _QueryKeyAttention(nn.Module):
    """``cross_attn``: RMS norms and the multi-head attention whose weights are used."""

    def __init__(self, dim: int = QK_DIM, heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.norm_q = nn.RMSNorm(dim)
        self.norm_k = nn.RMSNorm(dim)
        # Only the query/key input projections are used; the value and output projections
        # are part of the released weights but the values are the raw input features.
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)


def window_bounds(queries: int, keys: int, ratio: float, device: torch.device) -> torch.Tensor:
    """(queries, 2) long [first, end) key index of each query's window along one axis.

    Query q (centre ``(q + 0.5) / queries`` in [0, 1]) sees keys from
    ``floor(clamp(centre - ratio) * keys)`` to ``ceil(clamp(centre + ratio) * keys)``.
    """
    centre = (torch.arange(queries, device=device, dtype=torch.float32) + 0.5) / queries
    first = ((centre - ratio).clamp(0, 1) * keys).floor().long()
    end = ((centre + ratio).clamp(0, 1) * keys).ceil().long()
    return torch.stack([first, end], dim=1)


class _WindowedCrossAttention(nn.Module):
    """``cross_decode``: a 3x3 convolution of the queries, then windowed attention."""

    def __init__(self, dim: int = QK_DIM, heads: int = NUM_HEADS, ratio: float = WINDOW_RATIO):
        super().__init__()
        self.cross_attn = _QueryKeyAttention(dim, heads)
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.window_ratio = ratio

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        chunk_size: int,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Queries (B, D, H, W), keys (B, D, h, w), values (B, C, h, w) -> (B, C', H, W)
        float32, C' = C or what ``project`` ((B, n, C) -> (B, n, C')) makes of each chunk."""
        attention = self.cross_attn.attention
        heads, dim = attention.num_heads, attention.embed_dim
        weight_q, weight_k, _ = attention.in_proj_weight.chunk(3)
        bias_q, bias_k, _ = attention.in_proj_bias.chunk(3)
        queries = self.conv2d(queries).permute(0, 2, 3, 1)  # (B, H, W, D)
        keys = keys.permute(0, 2, 3, 1)
        queries = F.linear(self.cross_attn.norm_q(queries), weight_q, bias_q)
        keys = F.linear(self.cross_attn.norm_k(keys), weight_k, bias_k)
        batch, height, width, _ = queries.shape
        key_rows, key_cols = keys.shape[1:3]
        values = values.float().permute(0, 2, 3, 1)  # (B, h, w, C)
        row_windows = window_bounds(height, key_rows, self.window_ratio, queries.device)
        col_windows = window_bounds(width, key_cols, self.window_ratio, queries.device)
        col_index = torch.arange(key_cols, device=queries.device)
        col_ok = (col_index >= col_windows[:, :1]) & (col_index < col_windows[:, 1:])  # (W, w)
        band = max(1, chunk_size // width)
        outputs = []
        for top in range(0, height, band):
            bottom = min(top + band, height)
            first, end = int(row_windows[top, 0]), int(row_windows[bottom - 1, 1])
            row_index = torch.arange(first, end, device=queries.device)
            row_ok = (row_index >= row_windows[top:bottom, :1]) & (
                row_index < row_windows[top:bottom, 1:]
            )  # (rows, key rows)
            allowed = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).flatten(2).flatten(0, 1)
            q = queries[:, top:bottom].reshape(batch, -1, heads, dim // heads).transpose(1, 2)
            k = keys[:, first:end].reshape(batch, -1, heads, dim // heads).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(dim // heads)
            weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)
            mixed = weights @ values[:, first:end].flatten(1, 2)  # (B, band * W, C)
            outputs.append(project(mixed) if project is not None else mixed)
        out = torch.cat(outputs, dim=1)
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


class AnyUp(nn.Module):
    """The AnyUp upsampler; parameter names and shapes as in the authors' weight file.

    Shapes: ``image`` (B, 3, H, W) normalised with the ImageNet mean/std (whatever the
    backbone), ``features`` (B, C, h, w) of any C; the output is (B, C, H_out, W_out).

    Args:
        window_ratio: half-extent of each query's key window, as a fraction of the image
            (0.1, the released setting).
        chunk_size: output queries attended at a time (bounds the attention memory to about
            ``B * 4 * chunk_size * (0.2 h + 1) * w`` floats).
        device: where the bases and rotary frequencies are created (as torch modules take
            ``device=``); the convolutions start on the default device, ``.to()`` moves all.
    """

    def __init__(
        self,
        window_ratio: float = WINDOW_RATIO,
        chunk_size: int = AnyUpSettings.chunk_size,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.image_encoder = self._encoder(nn.Conv2d(3, QK_DIM, 1, bias=False))
        self.key_encoder = self._encoder(nn.Conv2d(QK_DIM, QK_DIM, 1, bias=False))
        self.query_encoder = self._encoder(nn.Conv2d(QK_DIM, QK_DIM, 1, bias=False))
        self.key_features_encoder = self._encoder(_FeatureUnification(device=device))
        self.cross_decode = _WindowedCrossAttention(ratio=window_ratio)
        self.aggregation = self._encoder(
            nn.Conv2d(2 * QK_DIM, QK_DIM, 3, padding=1, padding_mode="reflect", bias=False)
        )
        self.rope = _RotaryEmbedding(device=device)

    @staticmethod
    def _encoder(first: nn.Module) -> nn.Sequential:
        return nn.Sequential(first, _ResidualBlock(QK_DIM, QK_DIM), _ResidualBlock(QK_DIM, QK_DIM))

    def forward(
        self,
        image: torch.Tensor,
        features: torch.Tensor,
        output_size: Sequence[int] | None = None,
        values: torch.Tensor | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Upsample ``values`` (default: ``features``), attending with keys from ``features``.

        Args:
            image: (B, 3, H, W) ImageNet-normalised.
            features: (B, C, h, w) low-resolution features (they make the keys).
            output_size: (H_out, W_out); default (H, W).
            values: (B, V, h, w) what is mixed (e.g. per-patch class scores on the same grid);
                default the features.
            project: applied to every chunk of mixed values, (B, n, V) -> (B, n, V'), so that
                e.g. class scores are computed without holding (B, C, H, W) features.

        Returns:
            (B, V', H_out, W_out) float32.
        """
        size = tuple(output_size) if output_size is not None else tuple(image.shape[-2:])
        encoded = self.rope(self.image_encoder(image))
        queries = F.adaptive_avg_pool2d(self.query_encoder(encoded), size)
        keys = F.adaptive_avg_pool2d(self.key_encoder(encoded), features.shape[-2:])
        unified = self.key_features_encoder[0](F.normalize(features.float(), dim=1))
        unified = self.key_features_encoder[2](self.key_features_encoder[1](unified))
        keys = self.aggregation(torch.cat([keys, unified.to(keys.dtype)], dim=1))
        values = features if values is None else values
        return self.cross_decode(queries, keys, values, self.chunk_size, project)
