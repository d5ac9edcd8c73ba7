"""CLIP ViT used MaskCLIP-style: dense patch embeddings in the image-text space.

The last block's attention is replaced by its value path (value projection, then output
projection; no query-key mixing), keeping the block's residual connections and MLP; then
``ln_post`` and ``proj`` map every patch token into the joint space and the class token is
dropped. Position embeddings are resampled by scale factor (DINO convention). Every block runs
batch-first on contiguous tokens (see :func:`batch_first_attention`).

``dense_head=`` swaps the last block for a published training-free head (``sclip``,
``clearclip``, ``naclip``: :mod:`spar.models.dense_heads`); ``maskclip`` is the default.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from .base import Tokenizer, TrainableBlocks
from .dense_heads import (
    check_dense_head,
    check_head_block,
    head_block,
    naclip_bias,
    unused_last_block_modules,
)
from .open_clip_common import OpenClipBackbone, create_open_clip_model, seeded
from .pos_embed import ResampledPositions, resample_pos_embed_by_scale
from .registry import BackboneConfig, register_backbone

MASKCLIP = BackboneConfig(
    description="OpenCLIP ViT-B/16, MaskCLIP-style dense features, window 224",
    default_pretrained="laion2b_s34b_b88k",
    mean=OPENAI_DATASET_MEAN,
    std=OPENAI_DATASET_STD,
    native_size=224,
    embed_dim=512,
    architecture="ViT-B-16",
    license="MIT (OpenCLIP LAION-2B weights)",
)
TINY = BackboneConfig(
    description="tiny random CLIP ViT/16 on the MaskCLIP code path, for demos and tests",
    default_pretrained=None,
    mean=OPENAI_DATASET_MEAN,
    std=OPENAI_DATASET_STD,
    native_size=224,
    embed_dim=64,
)


def value_path_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention with every token attending only to itself: out_proj(v_proj(x)).

    Args:
        attn: the block's ``nn.MultiheadAttention``.
        x: (..., D) normalised tokens.
    Returns:
        (..., D), what the attention would return if each token's only key were itself.
    """
    dim = attn.embed_dim
    if attn._qkv_same_embed_dim:
        weight = attn.in_proj_weight[2 * dim :]
    else:
        weight = attn.v_proj_weight
    bias = attn.in_proj_bias[2 * dim :] if attn.in_proj_bias is not None else None
    return attn.out_proj(F.linear(x, weight, bias))


def batch_first_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The self-attention of ``attn`` with every projection on contiguous batch-first tokens.

    ``nn.MultiheadAttention(batch_first=True)`` transposes its input to sequence-first and
    applies the packed input projection to that non-contiguous (N, B, D) view, which runs as N
    small batched matmuls (``aten::bmm``, 13% of the student's GPU time at batch 32).

    Args:
        attn: a block's ``nn.MultiheadAttention`` (packed projection, no extra key/value bias).
        x: (B, N, D) normalised tokens.
    Returns:
        (B, N, D), what ``attn(x, x, x, need_weights=False)[0]`` returns.
    """
    batch, length, dim = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    dropout = attn.dropout if attn.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return attn.out_proj(x.transpose(1, 2).reshape(batch, length, dim))


def residual_block(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    attention: Callable[[nn.MultiheadAttention, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """An open_clip residual block with its attention computed by ``attention``;
    (B, N, D) -> (B, N, D)."""
    x = x + block.ls_1(attention(block.attn, block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def maskclip_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """An open_clip residual block run with value-path attention; (B, N, D) -> (B, N, D)."""
    return residual_block(block, x, value_path_attention)


def check_self_attention_blocks(blocks: nn.ModuleList) -> None:
    """Raise ``TypeError`` unless every block is a plain open_clip self-attention block."""
    for block in blocks:
        if not isinstance(block, ResidualAttentionBlock):
            raise TypeError(f"MaskCLIP needs ResidualAttentionBlock blocks, got {type(block)}")
        attn = block.attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError("MaskCLIP needs packed self-attention without extra key/value bias")


class MaskClipBackbone(OpenClipBackbone):
    """open_clip ``CLIP`` with a ``VisionTransformer`` tower, dense features from its last block
    run as ``dense_head`` says (default ``"maskclip"``: the value path)."""

    # naomikombol/SPAR models/model_open_clip.py (forward): the stride-16 conv1 drops an
    # image's last partial patch row/column.
    patch_fit = "truncate"

    def __init__(
        self, model: nn.Module, config: BackboneConfig, dense_head: str = "maskclip", **kwargs
    ) -> None:
        visual = model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TypeError(f"MaskCLIP needs an open_clip VisionTransformer, got {type(visual)}")
        if visual.attn_pool is not None:
            raise TypeError("MaskCLIP needs a class-token ViT without an attentional pooler")
        check_self_attention_blocks(visual.transformer.resblocks)
        check_head_block(check_dense_head(dense_head), visual.transformer.resblocks[-1])
        super().__init__(
            model,
            config,
            embed_dim=visual.output_dim,
            patch_size=visual.patch_size[0],
            **kwargs,
        )
        self.positions = ResampledPositions(resample_pos_embed_by_scale, num_prefix_tokens=1)
        self.dense_head = dense_head

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W), H and W multiples of p -> ((B, 1 + H/p * W/p, D) tokens after
        ``ln_pre``,), and for ``naclip`` its (1 + N, 1 + N) neighbourhood bias."""
        visual = self.model.visual
        x = visual.conv1(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        pos = self.positions(visual.positional_embedding, visual.grid_size, grid, x.dtype)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        tokens = visual.ln_pre(torch.cat([cls, x], dim=1) + pos)
        if self.dense_head == "naclip":
            return tokens, naclip_bias(grid, device=tokens.device)
        return (tokens,)

    def run_blocks(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, N, C): the blocks, the last one as the dense head says
        (``maskclip``: value path), then ``ln_post`` and ``proj`` on the patch tokens."""
        visual = self.model.visual
        x = tokens
        for block in self.blocks[:-1]:
            x = residual_block(block, x, batch_first_attention)
        if self.dense_head == "maskclip":
            x = maskclip_block(self.blocks[-1], x)
        else:
            x = head_block(self.dense_head, self.blocks[-1], x, bias)
        return visual.ln_post(x[:, 1:]) @ visual.proj

    def set_trainable_blocks(self, spec: TrainableBlocks) -> list[int]:
        """As :meth:`DenseBackbone.set_trainable_blocks`; the last block's modules that the dense
        head never runs (``ln_2`` and the MLP under ``clearclip`` and ``naclip``) stay frozen."""
        indices = super().set_trainable_blocks(spec)
        for module in unused_last_block_modules(self.dense_head, self.blocks[-1]):
            module.requires_grad_(False)
        return indices


def _clip_backbone(
    model: nn.Module,
    config: BackboneConfig,
    tokenizer: Tokenizer | None,
    fused_attention: bool,
    dense_head: str = "maskclip",
) -> MaskClipBackbone:
    """Wrap a CLIP model; every CLIP here uses the (offline) ``ViT-B-16`` tokenizer."""
    return MaskClipBackbone(
        model,
        config,
        dense_head=dense_head,
        tokenizer=tokenizer,
        tokenizer_name="ViT-B-16",
        fused_attention=fused_attention,
    )


def maskclip(
    config: BackboneConfig,
    pretrained: str | None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    dense_head: str = "maskclip",
) -> MaskClipBackbone:
    check_dense_head(dense_head)
    model = create_open_clip_model(config.architecture, pretrained)
    return _clip_backbone(model, config, tokenizer, fused_attention, dense_head)


def tiny_clip_config(width: int, depth: int, embed_dim: int, image_size: int) -> dict:
    """open_clip ``CLIP`` kwargs: a tiny ViT/16, a small CLIP-tokenizer text tower."""
    head_width = min(32, width)
    return dict(
        embed_dim=embed_dim,
        vision_cfg=dict(
            image_size=image_size, patch_size=16, width=width, layers=depth, head_width=head_width
        ),
        text_cfg=dict(
            context_length=77, vocab_size=49408, width=width, heads=width // head_width, layers=2
        ),
    )


def tiny(
    config: BackboneConfig,
    pretrained: str | None,
    tokenizer: Tokenizer | None = None,
    width: int = 64,
    depth: int = 4,
    embed_dim: int = 64,
    seed: int = 0,
    fused_attention: bool = True,
    dense_head: str = "maskclip",
) -> MaskClipBackbone:
    """Random weights drawn from ``seed``, so two calls give the same model."""
    check_dense_head(dense_head)
    kwargs = tiny_clip_config(width, depth, embed_dim, config.native_size)
    model = create_open_clip_model(None, pretrained, build=seeded(open_clip.CLIP, seed, **kwargs))
    return _clip_backbone(model, config, tokenizer, fused_attention, dense_head)


register_backbone("maskclip", maskclip, MASKCLIP)
register_backbone("tiny", tiny, TINY)
