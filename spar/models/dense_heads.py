"""Training-free dense heads: how the last block of a CLIP ViT turns tokens into dense features.

A head replaces the last residual block of an open_clip ``VisionTransformer``; every earlier block
runs unchanged, and ``ln_post`` and ``proj`` then map every patch token into the joint space (all
four published heads apply both to every token). The teacher and the student use the same head,
so SPAR distils any of them. ``maskclip`` (the default) lives in :mod:`spar.models.maskclip`;
this module holds the other three, on batch-first (B, N, D) tokens, class token first. ``scale``
is ``head_dim ** -0.5`` throughout.

- ``sclip`` (Wang et al., correlative self-attention): attention weights
  ``softmax(q qᵀ * scale) + softmax(k kᵀ * scale)`` (each row sums to 2; the sum is not
  renormalised), times v, then the output projection; the block keeps both residual
  connections and its feed-forward. Earlier blocks are unchanged. Follows wangf3014/SCLIP
  ``clip/model.py`` (``VisionTransformer.forward`` with ``csa=True`` and ``custom_attn``), commit
  961a11a514a274b40df6eeb5c512f501d1c0699d.
- ``clearclip`` (Lan et al.): attention weights ``softmax(q qᵀ * scale)``, times v, output
  projection, and that is the block's output: no residual connection and no feed-forward
  (``ln_2`` and the MLP are unused). Follows mc-lan/ClearCLIP ``open_clip/transformer.py``
  (``VisionTransformer.forward`` with ``model_type='ClearCLIP'``, ``ignore_residual=True``,
  ``last_n_layers=1``, and ``custom_attn``), commit afe06b8e42eb9623f6eb9da0cb0628bcc439a76d.
- ``naclip`` (Hajimiri et al.): attention logits ``k kᵀ * scale + G`` with G a Gaussian of the
  patch-grid distance, ``G[p, r] = exp(-|p - r|² / (2 σ²))`` in patch units (σ = 5, the
  authors' default ``gaussian_std``; the class token's row and column of G are 0: it attends
  and is attended without a neighbourhood term), softmax, times v, output projection; no
  residual and no feed-forward (their ``arch='reduced'``). The bias is added unscaled to the
  scaled logits. Follows sinahmr/NACLIP ``clip/model.py`` (``gaussian_window``,
  ``get_attention_addition``, ``custom_attn`` with ``attn_strategy='naclip'``) and ``naclip.py``
  (defaults), commit defb7c94b5a77a9c824188515a720ad9d242813d.

Each attention runs as ``F.scaled_dot_product_attention`` (its default scale is ``head_dim **
-0.5``, and its additive mask carries NACLIP's G), so the fused kernels apply. The published
heads are defined on blocks without layer scale; blocks with one are refused.

Training: under ``clearclip`` and ``naclip`` the last block's ``ln_2`` and MLP take no part in the
features, so :func:`unused_last_block_modules` names them and the backbone keeps them frozen
whatever ``trainable_blocks`` says (rows of the packed ``in_proj`` that a head ignores, e.g. k
under ``clearclip``, are part of one parameter and get zero gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ..config import SettingError

DENSE_HEADS = ("maskclip", "sclip", "clearclip", "naclip")
# Heads whose last block ends at its attention output (no residual, no feed-forward).
ATTENTION_ONLY_HEADS = ("clearclip", "naclip")
NACLIP_GAUSSIAN_STD = 5.0


def check_dense_head(head: str) -> str:
    """``head`` if it is one of :data:`DENSE_HEADS`; ``SettingError`` naming the key otherwise."""
    if head not in DENSE_HEADS:
        raise SettingError(
            f"backbone.dense_head {head!r} is not a dense head; use one of {', '.join(DENSE_HEADS)}"
        )
    return head


def check_head_block(head: str, block: nn.Module) -> None:
    """Raise ``TypeError`` when ``block`` has layer scale and ``head`` is a published non-MaskCLIP
    head (those are defined for blocks without it)."""
    if head == "maskclip" or not isinstance(block, ResidualAttentionBlock):
        return
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        raise TypeError(f"dense head {head!r} needs blocks without layer scale")


def unused_last_block_modules(head: str, block: ResidualAttentionBlock) -> list[nn.Module]:
    """The modules of the last block that ``head`` never runs (kept frozen in training)."""
    if head in ATTENTION_ONLY_HEADS:
        return [block.ln_2, block.mlp, block.ls_2]
    return []


def split_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, N, D) normalised tokens -> q, k, v of shape (B, heads, N, head_dim)."""
    batch, length, _ = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    return tuple(qkv.view(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4))


def merge_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) attention output -> (B, N, D) after the output projection."""
    batch, _, length, _ = x.shape
    return attn.out_proj(x.transpose(1, 2).reshape(batch, length, -1))


def sclip_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention; (B, N, D) -> (B, N, D)."""
    q, k, v = split_heads(attn, x)
    # (softmax(q qᵀ) + softmax(k kᵀ)) v, as two attentions that share v.
    out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    return merge_heads(attn, out)


def clearclip_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's q-q attention; (B, N, D) -> (B, N, D)."""
    q, _, v = split_heads(attn, x)
    return merge_heads(attn, F.scaled_dot_product_attention(q, q, v))


def naclip_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """NACLIP's neighbourhood attention: softmax(k kᵀ * scale + bias) v; (B, N, D) ->
    (B, N, D), ``bias`` (N, N) from :func:`naclip_bias`."""
    _, k, v = split_heads(attn, x)
    out = F.scaled_dot_product_attention(k, k, v, attn_mask=bias.to(k.dtype))
    return merge_heads(attn, out)


def naclip_bias(
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    std: float = NACLIP_GAUSSIAN_STD,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """NACLIP's additive attention term for a (rows, cols) patch grid, tokens row-major after
    ``num_prefix_tokens`` prefix tokens (whose rows and columns are 0): (N, N), float32."""
    rows, cols = grid
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32, device=device),
        torch.arange(cols, dtype=torch.float32, device=device),
        indexing="ij",
    )
    y, x = y.flatten(), x.flatten()
    squared = (y[:, None] - y[None, :]).square() + (x[:, None] - x[None, :]).square()
    gaussian = torch.exp(-squared / (2 * std**2))
    return F.pad(gaussian, (num_prefix_tokens, 0, num_prefix_tokens, 0))


def head_block(
    head: str, block: ResidualAttentionBlock, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The last block under ``head`` (``sclip``, ``clearclip`` or ``naclip``); (B, N, D) ->
    (B, N, D). ``bias``: NACLIP's (N, N) term."""
    if head == "sclip":
        x = x + block.ls_1(sclip_attention(block.attn, block.ln_1(x)))
        return x + block.ls_2(block.mlp(block.ln_2(x)))
    if head == "clearclip":
        return clearclip_attention(block.attn, block.ln_1(x))
    if head == "naclip":
        if bias is None:
            raise ValueError("the naclip head needs its neighbourhood bias")
        return naclip_attention(block.attn, block.ln_1(x), bias)
    raise ValueError(f"unknown dense head {head!r}")
