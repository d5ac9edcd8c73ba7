"""SigLIP2 ViT (open_clip wrapping a timm trunk) with per-patch embeddings in the text space.

Dense features skip the attention-pool query: the patch tokens after the trunk's final norm go
through the pool's value projection and output projection, then the pool's norm + MLP residual
(exactly what the pool does to its single output token, applied to every patch). Position
embeddings are resampled to the target grid size, bicubic without antialiasing.
"""

from __future__ import annotations

import open_clip
import timm
import torch
from open_clip.timm_model import TimmModel
from timm.layers import AttentionPoolLatent
from torch import nn

from .base import Tokenizer
from .open_clip_common import OpenClipBackbone, create_open_clip_model, seeded
from .pos_embed import resample_pos_embed_to_size
from .registry import register_backbone

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP2_MODEL = "ViT-B-16-SigLIP2-512"
SIGLIP2_TIMM_TRUNK = "vit_base_patch16_siglip_512"


def map_value_path(pool: AttentionPoolLatent, x: torch.Tensor) -> torch.Tensor:
    """Apply a MAP head to every token as if each token were the only key.

    Args:
        pool: timm ``AttentionPoolLatent``.
        x: (B, N, D) tokens after the trunk's final norm.
    Returns:
        (B, N, C) per-token outputs of the pool.
    """
    if pool.pos_embed is not None:
        raise ValueError("attention pools with their own position embedding are not supported")
    dim = pool.kv.out_features // 2
    values = pool.kv(x)[..., dim:]  # kv packs (2, heads, head_dim): the second half is v
    x = pool.proj_drop(pool.proj(values))
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    return x


class SigLIP2Backbone(OpenClipBackbone):
    """open_clip ``CustomTextCLIP`` with a timm ViT trunk and a MAP (attention-pool) head."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        visual = model.visual
        if not isinstance(visual, TimmModel) or not isinstance(
            getattr(visual.trunk, "attn_pool", None), AttentionPoolLatent
        ):
            raise TypeError("SigLIP2 needs an open_clip TimmModel whose trunk ends in a MAP pool")
        trunk = visual.trunk
        if trunk.num_prefix_tokens != 0:
            raise TypeError("SigLIP2 trunks have no class or register tokens")
        patch = trunk.patch_embed.patch_size[0]
        grid = trunk.patch_embed.grid_size
        super().__init__(
            model,
            embed_dim=trunk.attn_pool.out_features,
            native_size=(grid[0] * patch, grid[1] * patch),
            patch_size=patch,
            **kwargs,
        )

    @property
    def trunk(self) -> nn.Module:
        return self.model.visual.trunk

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def forward_padded(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of p -> (B, C, H/p, W/p)."""
        trunk = self.trunk
        x = trunk.patch_embed.proj(images)
        batch, grid = x.shape[0], tuple(x.shape[-2:])
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = resample_pos_embed_to_size(trunk.pos_embed[0], trunk.patch_embed.grid_size, grid)
        x = trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(x + pos.to(x.dtype))))
        x = trunk.norm(trunk.blocks(x))
        x = self.model.visual.head(map_value_path(trunk.attn_pool, x))
        return x.transpose(1, 2).reshape(batch, -1, *grid)


def _siglip2_backbone(
    model: nn.Module, tokenizer: Tokenizer | None, fused_attention: bool = True
) -> SigLIP2Backbone:
    return SigLIP2Backbone(
        model,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        tokenizer=tokenizer,
        tokenizer_name=SIGLIP2_MODEL,
        fused_attention=fused_attention,
    )


@register_backbone(
    "siglip2",
    default_pretrained="webli",
    description="SigLIP2 ViT-B/16-512 (open_clip), MAP-head value path, window 512",
)
def siglip2(
    pretrained: str | None, tokenizer: Tokenizer | None = None, fused_attention: bool = True
) -> SigLIP2Backbone:
    """The tokenizer, when not given, is SigLIP2's Gemma tokenizer (needs ``transformers`` and a
    hub download on first use)."""
    model = create_open_clip_model(SIGLIP2_MODEL, pretrained)
    return _siglip2_backbone(model, tokenizer, fused_attention)


def build_tiny_siglip2(width: int, depth: int, image_size: int) -> nn.Module:
    """A ``CustomTextCLIP`` laid out like ViT-B-16-SigLIP2-512 with a tiny trunk and text tower.

    open_clip builds timm trunks by name only, so the base-size trunk it creates is swapped for
    the same timm architecture at tiny width and depth.
    """
    heads = max(1, width // 32)
    model = open_clip.CustomTextCLIP(
        embed_dim=width,
        vision_cfg=dict(
            timm_model_name=SIGLIP2_TIMM_TRUNK, timm_pool="map", timm_proj="none", image_size=512
        ),
        text_cfg=dict(
            context_length=64,
            vocab_size=49408,
            width=width,
            heads=heads,
            layers=2,
            no_causal_mask=True,
            proj_bias=True,
            pool_type="last",
            norm_kwargs={"eps": 1e-6},
            act_kwargs={"approximate": "tanh"},
        ),
        init_logit_bias=-10,
    )
    model.visual.trunk = timm.create_model(
        SIGLIP2_TIMM_TRUNK,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        global_pool="map",
        img_size=image_size,
    )
    model.visual.image_size = (image_size, image_size)
    return model


@register_backbone(
    "siglip2-tiny",
    default_pretrained=None,
    description="tiny random SigLIP2-layout model on the siglip2 code path, for tests",
)
def siglip2_tiny(
    pretrained: str | None,
    tokenizer: Tokenizer | None = None,
    width: int = 64,
    depth: int = 4,
    image_size: int = 128,
    seed: int = 0,
    fused_attention: bool = True,
) -> SigLIP2Backbone:
    """Random weights drawn from ``seed``; the CLIP tokenizer (offline) unless one is given."""
    build = seeded(build_tiny_siglip2, seed, width, depth, image_size)
    if tokenizer is None:
        tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=64)
    model = create_open_clip_model(None, pretrained, build=build)
    return _siglip2_backbone(model, tokenizer, fused_attention)
