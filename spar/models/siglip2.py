"""SigLIP2 ViT (open_clip wrapping a timm trunk) with per-patch embeddings in the text space.

Dense features skip the attention-pool query: the patch tokens after the trunk's final norm go
through the pool's value projection and output projection, then the pool's norm + MLP residual
(exactly what the pool does to its single output token, applied to every patch). Position
embeddings are resampled to the target grid size, bicubic without antialiasing.

``architecture=`` builds another open_clip SigLIP2 model on the same path (e.g.
``ViT-SO400M-16-SigLIP2-512``, ``ViT-L-16-SigLIP2-512``); its native size, patch size,
normalisation and embedding size are then read from the built model and open_clip's
configuration (:func:`~spar.models.open_clip_common.describe_model`).
"""

from __future__ import annotations

import open_clip
import timm
import torch
from open_clip.timm_model import TimmModel
from timm.layers import AttentionPoolLatent
from torch import nn

from ..config import SettingError
from .base import Tokenizer
from .open_clip_common import (
    OpenClipBackbone,
    create_open_clip_model,
    describe_model,
    open_clip_model_config,
    seeded,
)
from .pos_embed import ResampledPositions, resample_pos_embed_to_size
from .registry import BackboneConfig, register_backbone

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP2 = BackboneConfig(
    description="SigLIP2 ViT-B/16-512 (open_clip), MAP-head value path, window 512",
    default_pretrained="webli",
    mean=SIGLIP_MEAN,
    std=SIGLIP_STD,
    native_size=512,
    embed_dim=768,
    architecture="ViT-B-16-SigLIP2-512",
    license="Apache-2.0 (Google SigLIP2 weights)",
)
SIGLIP2_TINY = BackboneConfig(
    description="tiny random SigLIP2-layout model on the siglip2 code path, for tests",
    default_pretrained=None,
    mean=SIGLIP_MEAN,
    std=SIGLIP_STD,
    native_size=128,
    embed_dim=64,
)
# The timm trunk of ViT-B-16-SigLIP2-512, which the tiny model builds at tiny width and depth.
SIGLIP2_TIMM_TRUNK = "vit_base_patch16_siglip_512"
# timm's smallest registered ViT: what open_clip builds (by name only) in the tiny model's trunk
# slot before the tiny SigLIP2 trunk replaces it; about 10 ms.
PLACEHOLDER_TRUNK = "test_vit"


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

    def __init__(self, model: nn.Module, config: BackboneConfig, **kwargs) -> None:
        visual = model.visual
        if not isinstance(visual, TimmModel) or not isinstance(
            getattr(visual.trunk, "attn_pool", None), AttentionPoolLatent
        ):
            raise TypeError("SigLIP2 needs an open_clip TimmModel whose trunk ends in a MAP pool")
        trunk = visual.trunk
        if trunk.num_prefix_tokens != 0:
            raise TypeError("SigLIP2 trunks have no class or register tokens")
        super().__init__(
            model,
            config,
            embed_dim=trunk.attn_pool.out_features,
            patch_size=trunk.patch_embed.patch_size[0],
            **kwargs,
        )
        self.positions = ResampledPositions(resample_pos_embed_to_size)

    @property
    def trunk(self) -> nn.Module:
        return self.model.visual.trunk

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        """(B, 3, H, W), H and W multiples of p -> ((B, H/p * W/p, D) tokens with positions,)."""
        trunk = self.trunk
        x = trunk.patch_embed.proj(images)
        grid = tuple(x.shape[-2:])
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = self.positions(trunk.pos_embed[0], trunk.patch_embed.grid_size, grid, x.dtype)
        return (trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(x + pos))),)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, C): the blocks, then the attention pool's value path per token."""
        trunk = self.trunk
        x = trunk.norm(trunk.blocks(tokens))
        return self.model.visual.head(map_value_path(trunk.attn_pool, x))


def check_siglip2_architecture(architecture: str) -> None:
    """``SettingError`` unless ``architecture`` is an open_clip model with a timm trunk ending in
    a MAP (attention-pool) head, as the SigLIP2 models are."""
    vision = open_clip_model_config(architecture).get("vision_cfg", {})
    if "timm_model_name" not in vision or vision.get("timm_pool") != "map":
        raise SettingError(
            f"backbone.architecture {architecture!r} is not a SigLIP-layout open_clip model (a "
            "timm trunk with a MAP head), e.g. ViT-SO400M-16-SigLIP2-512 or ViT-L-16-SigLIP2-512"
        )


def siglip2(
    config: BackboneConfig,
    pretrained: str | None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    architecture: str | None = None,
) -> SigLIP2Backbone:
    """The tokenizer, when not given, is SigLIP2's Gemma tokenizer (needs ``transformers`` and a
    hub download on first use). ``architecture``: another open_clip SigLIP2 model than the
    default ``ViT-B-16-SigLIP2-512``."""
    if architecture is not None and architecture != config.architecture:
        check_siglip2_architecture(architecture)
        model = create_open_clip_model(architecture, pretrained)
        trunk = model.visual.trunk
        config = describe_model(
            config,
            model,
            architecture,
            pretrained,
            patch_size=trunk.patch_embed.patch_size[0],
            embed_dim=trunk.attn_pool.out_features,
        )
        return SigLIP2Backbone(
            model,
            config,
            tokenizer=tokenizer,
            tokenizer_name=architecture,
            fused_attention=fused_attention,
        )
    model = create_open_clip_model(config.architecture, pretrained)
    return SigLIP2Backbone(
        model,
        config,
        tokenizer=tokenizer,
        tokenizer_name=config.architecture,
        fused_attention=fused_attention,
    )


def build_tiny_siglip2(width: int, depth: int, image_size: int) -> nn.Module:
    """A ``CustomTextCLIP`` laid out like ViT-B-16-SigLIP2-512 with a tiny trunk and text tower.

    open_clip builds a timm trunk from its registered name only, with timm's default size, so
    the model is built around :data:`PLACEHOLDER_TRUNK` and gets the SigLIP2 trunk at tiny
    width and depth in its place (building the base-size trunk instead takes seconds).
    """
    heads = max(1, width // 32)
    model = open_clip.CustomTextCLIP(
        embed_dim=width,
        vision_cfg=dict(
            timm_model_name=PLACEHOLDER_TRUNK,
            timm_pool="map",
            timm_proj="none",
            image_size=image_size,
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
    return model


def siglip2_tiny(
    config: BackboneConfig,
    pretrained: str | None,
    tokenizer: Tokenizer | None = None,
    width: int = 64,
    depth: int = 4,
    seed: int = 0,
    fused_attention: bool = True,
) -> SigLIP2Backbone:
    """Random weights drawn from ``seed``; the CLIP tokenizer at the model's 64 tokens (offline)
    unless one is given."""
    build = seeded(build_tiny_siglip2, seed, width, depth, config.native_size)
    model = create_open_clip_model(None, pretrained, build=build)
    return SigLIP2Backbone(
        model,
        config,
        tokenizer=tokenizer,
        tokenizer_name="ViT-B-16",
        fused_attention=fused_attention,
    )


register_backbone("siglip2", siglip2, SIGLIP2)
register_backbone("siglip2-tiny", siglip2_tiny, SIGLIP2_TINY)
