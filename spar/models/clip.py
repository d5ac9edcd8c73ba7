"""Any open_clip CLIP ViT with a class token as a SPAR backbone (``clip``), with any dense head.

``create_backbone("clip", "metaclip_fullcc", architecture="ViT-L-14", dense_head="naclip")``
(in configs ``backbone=clip backbone.architecture=ViT-L-14 backbone.pretrained=metaclip_fullcc
backbone.dense_head=naclip``) builds open_clip's ``architecture`` and runs it on the MaskCLIP
code path (:class:`~spar.models.maskclip.MaskClipBackbone`): position embeddings resampled by
scale factor, the last block run by the dense head (:mod:`spar.models.dense_heads`). Patch size,
native size (the teacher's window), normalisation and embedding size are read from the built
model and open_clip's configuration of the architecture and tag
(:func:`~spar.models.open_clip_common.describe_model`), never from a table here. A tag trained
with QuickGELU (``openai``, ``metaclip_*``, ``dfn2b``) builds the architecture with QuickGELU.

Only open_clip's own ``VisionTransformer`` towers qualify: architectures whose tower is a timm
trunk (EVA02, SigLIP, ...) or a ResNet, or that end in an attentional pooler (CoCa), are refused
with a ``SettingError`` before anything is built.

``clip-tiny`` (patch 16) and ``clip-tiny-p14`` (patch 14) are random models built from an
open_clip model-configuration dict (no hub), on the same path, for tests and demos.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from ..config import SettingError
from .base import Tokenizer
from .dense_heads import check_dense_head
from .maskclip import MaskClipBackbone
from .open_clip_common import (
    create_open_clip_model,
    describe_model,
    open_clip_model_config,
    seeded,
    tag_config,
)
from .registry import BackboneConfig, register_backbone

DEFAULT_ARCHITECTURE = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"

# Tiny open_clip model configurations (the layout of open_clip's model JSON files).
CLIP_TINY_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 128, "patch_size": 16, "width": 64, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLIP_TINY_P14_MODEL = {
    **CLIP_TINY_MODEL,
    "vision_cfg": {**CLIP_TINY_MODEL["vision_cfg"], "image_size": 112, "patch_size": 14},
}


def check_clip_architecture(architecture: str) -> dict:
    """open_clip's configuration of ``architecture`` if its tower is an open_clip
    ``VisionTransformer`` with a class token; ``SettingError`` naming the value otherwise."""
    config = open_clip_model_config(architecture)
    vision = config.get("vision_cfg", {})
    if "timm_model_name" in vision:
        raise SettingError(
            f"backbone.architecture {architecture!r}: its image tower is the timm trunk "
            f"{vision['timm_model_name']!r}, not an open_clip VisionTransformer; backbone clip "
            "runs open_clip ViTs with a class token (EVA02 and other timm towers are not "
            "supported; SigLIP2 is backbone=siglip2)"
        )
    if isinstance(vision.get("layers"), (list, tuple)):
        raise SettingError(f"backbone.architecture {architecture!r} is a ResNet, not a ViT")
    if vision.get("attentional_pool"):
        raise SettingError(
            f"backbone.architecture {architecture!r} ends in an attentional pooler (CoCa); "
            "backbone clip needs a class-token ViT"
        )
    return config


def config_of(
    architecture: str, pretrained: str | None, description: str, license: str | None = None
) -> BackboneConfig:
    """The registry configuration of ``architecture`` with tag ``pretrained``, read from open_clip's
    configuration files (nothing is built)."""
    vision = check_clip_architecture(architecture)["vision_cfg"]
    tag = tag_config(architecture, pretrained)
    return BackboneConfig(
        description=description,
        default_pretrained=pretrained,
        mean=tuple(tag.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(tag.get("std", OPENAI_DATASET_STD)),
        native_size=vision["image_size"],
        embed_dim=open_clip_model_config(architecture)["embed_dim"],
        patch_size=vision["patch_size"],
        architecture=architecture,
        license=license,
    )


def config_of_dict(model_config: dict, description: str) -> BackboneConfig:
    """The registry configuration of a tiny model built from ``model_config`` (random)."""
    vision = model_config["vision_cfg"]
    return BackboneConfig(
        description=description,
        default_pretrained=None,
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        native_size=vision["image_size"],
        embed_dim=model_config["embed_dim"],
        patch_size=vision["patch_size"],
    )


CLIP = config_of(
    DEFAULT_ARCHITECTURE,
    DEFAULT_PRETRAINED,
    "any open_clip CLIP ViT (backbone.architecture, default ViT-B-16 openai) with a dense head",
    license="MIT (OpenAI CLIP weights; other tags carry their own, see docs/backbones.md)",
)
CLIP_TINY = config_of_dict(
    CLIP_TINY_MODEL, "tiny random CLIP ViT/16 on the clip code path, for tests"
)
CLIP_TINY_P14 = config_of_dict(
    CLIP_TINY_P14_MODEL, "tiny random CLIP ViT/14 on the clip code path (stitching factor 7)"
)


def wrap_clip(
    model: nn.Module,
    config: BackboneConfig,
    architecture: str | None,
    pretrained: str | None,
    *,
    dense_head: str,
    tokenizer: Tokenizer | None,
    tokenizer_name: str,
    fused_attention: bool,
) -> MaskClipBackbone:
    """``model`` as a dense backbone, configured from the model itself."""
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise TypeError(f"backbone clip needs an open_clip VisionTransformer, got {type(visual)}")
    config = describe_model(
        config,
        model,
        architecture,
        pretrained,
        patch_size=visual.patch_size[0],
        embed_dim=visual.output_dim,
    )
    return MaskClipBackbone(
        model,
        config,
        dense_head=dense_head,
        tokenizer=tokenizer,
        tokenizer_name=tokenizer_name,
        fused_attention=fused_attention,
    )


def clip(
    config: BackboneConfig,
    pretrained: str | None,
    architecture: str | None = None,
    dense_head: str = "maskclip",
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
) -> MaskClipBackbone:
    """open_clip ``architecture`` (default ``config.architecture``) with ``pretrained`` weights
    (a tag of it, ``hf-hub:``, a file or ``None``), dense features from ``dense_head``."""
    architecture = architecture or config.architecture
    check_dense_head(dense_head)
    model_config = check_clip_architecture(architecture)
    quick_gelu = bool(model_config.get("quick_gelu")) or bool(
        tag_config(architecture, pretrained).get("quick_gelu")
    )

    def build() -> nn.Module:
        return open_clip.create_model(architecture, pretrained=None, force_quick_gelu=quick_gelu)

    model = create_open_clip_model(architecture, pretrained, build=build, quick_gelu=quick_gelu)
    return wrap_clip(
        model,
        config,
        architecture,
        pretrained,
        dense_head=dense_head,
        tokenizer=tokenizer,
        tokenizer_name=architecture,
        fused_attention=fused_attention,
    )


def tiny_factory(model_config: dict) -> Callable[..., MaskClipBackbone]:
    """The factory of a tiny random CLIP built from the open_clip configuration ``model_config``."""

    def tiny_clip(
        config: BackboneConfig,
        pretrained: str | None,
        dense_head: str = "maskclip",
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        fused_attention: bool = True,
    ) -> MaskClipBackbone:
        """Random weights drawn from ``seed``; the offline ``ViT-B-16`` (CLIP BPE) tokenizer."""
        check_dense_head(dense_head)
        build = seeded(open_clip.CLIP, seed, **model_config)
        model = create_open_clip_model(None, pretrained, build=build)
        return wrap_clip(
            model,
            config,
            None,
            pretrained,
            dense_head=dense_head,
            tokenizer=tokenizer,
            tokenizer_name="ViT-B-16",
            fused_attention=fused_attention,
        )

    return tiny_clip


register_backbone("clip", clip, CLIP)
register_backbone("clip-tiny", tiny_factory(CLIP_TINY_MODEL), CLIP_TINY)
register_backbone("clip-tiny-p14", tiny_factory(CLIP_TINY_P14_MODEL), CLIP_TINY_P14)
