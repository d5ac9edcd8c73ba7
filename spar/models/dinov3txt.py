"""DINOv3.txt: the DINOv3 ViT-L/16 trunk (timm) with the dino.txt vision head and text tower.

The trunk is timm's ``vit_large_patch16_dinov3_qkvb`` (rotary position embeddings, four register
tokens, any resolution). The dino.txt vision head (two self-attention blocks with SwiGLU MLPs and
layer scale, no position embedding, then a final LayerNorm) runs on the trunk's normalised
class, register and patch tokens; its patch tokens are the dense features. dino.txt's joint space
concatenates [class token, mean patch token] (2 x 1024 = 2048); the text embedding's second half
is the one aligned with patch tokens, so ``encode_text`` returns that half.

Parameter names follow the official dino.txt model under ``model.``: ``visual_model.backbone``
(timm names), ``visual_model.head``, ``text_model.backbone``, ``text_model.head``,
``logit_scale``. The official files load strictly: the head-and-text file as it is, the backbone
file through timm's DINOv3 key conversion (``storage_tokens`` -> ``reg_token``, ``ls1.gamma`` ->
``gamma_1``, masked ``qkv.bias`` -> ``q_bias``/``v_bias``; ``rope_embed.periods``, ``mask_token``
and ``bias_mask`` are not parameters).

The model's modules are in :mod:`spar.models.dinov3txt_layers`; this module adapts the model to
the dense-backbone contract, converts the official weight files and registers both sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models import eva
from torch import nn

from .base import DenseBackbone, Tokenizer
from .dinov3txt_layers import DinoTxtArchitecture, DinoTxtModel, clip_bpe_tokenizer
from .open_clip_common import attention_backend, seeded
from .registry import BackboneConfig, register_backbone
from .weights import WeightLoadingError, load_state_dict_strict, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL = "official"  # pretrained tag: the two official weight files
TRUNK = "vit_large_patch16_dinov3_qkvb"
DINOV3TXT = BackboneConfig(
    description="DINOv3 ViT-L/16 + dino.txt head and text tower (official files), window 384",
    default_pretrained=OFFICIAL,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    native_size=384,
    embed_dim=1024,
    architecture=TRUNK,
    license="DINOv3 License (Meta; accepted when downloading the official files)",
)
DINOV3TXT_TINY = BackboneConfig(
    description="tiny random DINOv3.txt layout on the dinov3txt code path, for tests",
    default_pretrained=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    native_size=128,
    embed_dim=64,
    architecture=TRUNK,
)
TINY_ARCHITECTURE = DinoTxtArchitecture(
    width=64, depth=4, heads=4, text_width=64, text_heads=2, text_layers=2
)


class DinoV3TxtBackbone(DenseBackbone):
    """Dense features = the vision head's patch tokens; text = the patch-aligned half."""

    def __init__(
        self,
        model: DinoTxtModel,
        config: BackboneConfig,
        tokenizer: Tokenizer | None,
        fused_attention: bool = True,
        bpe_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.visual_model.backbone.patch_embed.patch_size[0]
        self.embed_dim = model.arch.width
        self.native_size = (config.native_size, config.native_size)
        self.mean, self.std = config.mean, config.std
        self._tokenizer = tokenizer
        self._bpe_path = bpe_path
        self.fused_attention = fused_attention

    @property
    def tokenizer(self) -> Tokenizer:
        """CLIP's BPE tokenizer, as dino.txt uses it (see :func:`clip_bpe_tokenizer`), built on
        first use."""
        if self._tokenizer is None:
            self._tokenizer = clip_bpe_tokenizer(self.model.arch.context_length, self._bpe_path)
        return self._tokenizer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual_model.backbone.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with attention_backend(self.fused_attention):
            return super().forward(images)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W), H and W multiples of 16 -> (B, P + H/16 * W/16, D) tokens (P prefix
        tokens) and the grid's rotary embedding (``None`` without RoPE), as timm's
        ``Eva.forward_features`` makes them."""
        trunk = self.model.visual_model.backbone
        if getattr(trunk, "rope_mixed", False):
            raise TypeError("DINOv3.txt trunks with depth-dependent (mixed) RoPE are not supported")
        tokens, rope = trunk._pos_embed(trunk.patch_embed(images))
        return trunk.norm_pre(tokens), rope

    def run_blocks(self, tokens: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P + N, D) tokens and rotary embedding -> (B, N, width): the blocks, the final norm
        and the vision head's patch tokens."""
        trunk = self.model.visual_model.backbone
        for block in trunk.blocks:
            tokens = block(tokens, rope=rope)
        tokens = self.model.visual_model.head(trunk.norm(tokens))
        return tokens[:, trunk.num_prefix_tokens :]

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, width): the patch-aligned half of the text embedding."""
        with attention_backend(self.fused_attention):
            return self.model.text_model(tokens)[:, self.model.arch.width :]

    def map_released_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Released SPAR weights name the trunk as the official DINOv3 code does: convert."""
        prefix = "model.visual_model.backbone."
        trunk = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not trunk or "reg_token" in trunk:
            return state
        converted = eva.checkpoint_filter_fn(trunk, self.model.visual_model.backbone)
        rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
        return {**rest, **{prefix + k: v for k, v in converted.items()}}


def official_state(
    model: DinoTxtModel,
    backbone_state: dict[str, torch.Tensor],
    head_and_text: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` made from the two official files' contents: the backbone
    file's keys through timm's DINOv3 conversion, under ``visual_model.backbone.``; the
    head-and-text file's keys as they are."""
    converted = eva.checkpoint_filter_fn(backbone_state, model.visual_model.backbone)
    return {**{f"visual_model.backbone.{k}": v for k, v in converted.items()}, **head_and_text}


def load_official_weights(
    model: DinoTxtModel, backbone_weights: str | Path, weights: str | Path
) -> None:
    """Fill ``model`` from the official backbone file and the head-and-text-encoder file.

    The two files together must cover the model exactly (after the trunk's key conversion);
    otherwise the error lists what is missing, unexpected or mis-shaped.
    """
    backbone_state = read_state_dict(backbone_weights)
    if "storage_tokens" not in backbone_state:
        raise WeightLoadingError(
            f"{backbone_weights} does not look like an official DINOv3 backbone file "
            "(no 'storage_tokens'); expected dinov3_vitl16_pretrain_lvd1689m-*.pth"
        )
    state = official_state(model, backbone_state, read_state_dict(weights))
    load_state_dict_strict(
        model, state, source=f"{Path(backbone_weights).name} + {Path(weights).name}"
    )


def _build(
    config: BackboneConfig,
    arch: DinoTxtArchitecture,
    pretrained: str | None,
    backbone_weights: str | Path | None,
    weights: str | Path | None,
    tokenizer: Tokenizer | None,
    fused_attention: bool,
    bpe_path: str | None,
    seed: int = 0,
) -> DinoV3TxtBackbone:
    model = seeded(DinoTxtModel, seed, arch, config.architecture, config.native_size)()
    if pretrained == OFFICIAL:
        if backbone_weights is None or weights is None:
            raise WeightLoadingError(
                "dinov3txt needs the two official weight files: backbone_weights="
                "dinov3_vitl16_pretrain_lvd1689m-*.pth and weights="
                "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-*.pth (or pretrained=None "
                "for random weights)"
            )
        load_official_weights(model, backbone_weights, weights)
    elif pretrained is not None:
        raise ValueError(f"dinov3txt accepts pretrained='{OFFICIAL}' or None, got {pretrained!r}")
    return DinoV3TxtBackbone(model.eval(), config, tokenizer, fused_attention, bpe_path)


def dinov3txt(
    config: BackboneConfig,
    pretrained: str | None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    bpe_path: str | None = None,
) -> DinoV3TxtBackbone:
    return _build(
        config,
        DinoTxtArchitecture(),
        pretrained,
        backbone_weights,
        weights,
        tokenizer,
        fused_attention,
        bpe_path,
    )


def dinov3txt_tiny(
    config: BackboneConfig,
    pretrained: str | None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    bpe_path: str | None = None,
    seed: int = 0,
) -> DinoV3TxtBackbone:
    return _build(
        config,
        TINY_ARCHITECTURE,
        pretrained,
        backbone_weights,
        weights,
        tokenizer,
        fused_attention,
        bpe_path,
        seed,
    )


register_backbone("dinov3txt", dinov3txt, DINOV3TXT)
register_backbone("dinov3txt-tiny", dinov3txt_tiny, DINOV3TXT_TINY)
