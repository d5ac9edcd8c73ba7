"""DINOv3.txt: the DINOv3 ViT-L/16 trunk (timm) with the dino.txt vision head and text tower.

The trunk is timm's ``vit_large_patch16_dinov3_qkvb`` (rotary position embeddings, four register
tokens, any resolution). By default the dense features are computed as the SPAR authors' wrapper
computes them (naomikombol/SPAR ``models/model_dinov3txt.py``, ``DINOv3txtWrapper.encode_image``,
commit 0f63ff2; Meta's ``notebooks/dinotxt_segmentation_inference.ipynb`` does the same):

* an image whose sides are not multiples of 16 is first stretched, bicubically
  (``align_corners=False``, no antialiasing), to the next multiples of 16 (``patch_fit="stretch"``);
* the features are output ``[2]`` of Meta's ``VisionTower.get_class_and_patch_tokens``
  (facebookresearch/dinov3 ``dinov3/eval/text/vision_tower.py``, commit 6876159): the trunk's
  last block, through the trunk's final LayerNorm ``norm``, patch tokens only, without the
  dino.txt vision head (``dense_tokens="trunk"``). They are 1024-d, the width of the trunk; the
  released SPAR DINOv3.txt weights and the paper's DINOv3.txt rows are for this output.

``dense_tokens="head"`` instead returns output ``[1]``, the dino.txt vision head's patch tokens
(two self-attention blocks with SwiGLU MLPs and layer scale, no position embedding, then a final
LayerNorm, run on the trunk's normalised class, register and patch tokens); this is *not* the
paper's setting. ``patch_fit="pad"`` zero-pads at the bottom/right instead of stretching.

dino.txt's joint space concatenates [class token, mean patch token] (2 x 1024 = 2048); the text
embedding's second half is the one aligned with patch tokens, so ``encode_text`` returns that half,
as the authors' ``encode_text`` (``text_model(...)[:, 1024:]``) and Meta's notebook do; their
segmentor compares it, L2-normalised, with the L2-normalised output ``[2]``.

Parameter names follow the official dino.txt model under ``model.``: ``visual_model.backbone``
(timm names), ``visual_model.head``, ``text_model.backbone``, ``text_model.head``,
``logit_scale``. The official files load strictly: the head-and-text file as it is, the backbone
file through timm's DINOv3 key conversion (``storage_tokens`` -> ``reg_token``, ``ls1.gamma`` ->
``gamma_1``, masked ``qkv.bias`` -> ``q_bias``/``v_bias``; ``mask_token`` and ``bias_mask`` are
not parameters) plus ``rope_embed.periods`` -> ``rope.periods``: the rotary periods the file
holds (bf16-rounded in the official file) are used as they are, as Meta's code uses them (see
:class:`~spar.models.dinov3txt_layers.StoredPeriodsRope`).

The model's modules are in :mod:`spar.models.dinov3txt_layers`; this module adapts the model to
the dense-backbone contract, converts the official weight files and registers both sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models import eva
from torch import nn

from .base import DenseBackbone, Tokenizer, check_images, pad_to_patch_multiple
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
DENSE_TOKENS = ("trunk", "head")  # output [2] / [1] of Meta's get_class_and_patch_tokens
PATCH_FITS = ("stretch", "pad")
OFFICIAL_PERIODS = "rope_embed.periods"  # the backbone file's name for the RoPE periods
TIMM_PERIODS = "rope.periods"


def stretch_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, ceil(H/p) p, ceil(W/p) p), resized bicubically
    (``align_corners=False``, no antialiasing) when a side is not a multiple of ``patch_size``,
    as the SPAR authors' DINOv3.txt wrapper does; unchanged otherwise."""
    height, width = images.shape[-2:]
    size = (-(-height // patch_size) * patch_size, -(-width // patch_size) * patch_size)
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class DinoV3TxtBackbone(DenseBackbone):
    """Dense features = the trunk's normed patch tokens (default) or the vision head's; text =
    the patch-aligned half.

    Args:
        model: the dino.txt model.
        config: its registry config.
        tokenizer: ``list[str] -> (N, 77)`` token ids; ``None``: CLIP's BPE, built on first use.
        fused_attention: SDPA's fused kernels (``False``: the math kernel).
        bpe_path: a local copy of the BPE vocabulary.
        dense_tokens: ``"trunk"`` (default, the paper's): output ``[2]`` of Meta's
            ``get_class_and_patch_tokens``, the trunk's final-norm patch tokens, without the
            vision head; ``"head"``: output ``[1]``, the vision head's patch tokens (not the
            paper's).
        patch_fit: ``"stretch"`` (default, the paper's): sides that are not multiples of 16 are
            resized bicubically to the next multiples; ``"pad"``: zero-padded at the
            bottom/right.
    """

    def __init__(
        self,
        model: DinoTxtModel,
        config: BackboneConfig,
        tokenizer: Tokenizer | None,
        fused_attention: bool = True,
        bpe_path: str | Path | None = None,
        dense_tokens: str = "trunk",
        patch_fit: str = "stretch",
    ) -> None:
        check_choice("dense_tokens", dense_tokens, DENSE_TOKENS)
        check_choice("patch_fit", patch_fit, PATCH_FITS)
        super().__init__()
        self.dense_tokens = dense_tokens
        self.patch_fit = patch_fit
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
        """(B, 3, H, W) normalised images -> (B, C, ceil(H/16), ceil(W/16)) dense features, the
        image first stretched (``patch_fit="stretch"``) or padded (``"pad"``) to multiples of
        16."""
        check_images(images)
        with attention_backend(self.fused_attention):
            return self.forward_padded(self.fit_to_patches(images))

    def fit_to_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, ceil(H/16) 16, ceil(W/16) 16) by the ``patch_fit`` rule."""
        if self.patch_fit == "stretch":
            return stretch_to_patch_multiple(images, self.patch_size)
        return pad_to_patch_multiple(images, self.patch_size)

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
        """(B, P + N, D) tokens and rotary embedding -> (B, N, width): the blocks and the trunk's
        final norm, then (``dense_tokens="head"`` only) the vision head; the patch tokens."""
        trunk = self.model.visual_model.backbone
        for block in trunk.blocks:
            tokens = block(tokens, rope=rope)
        tokens = trunk.norm(tokens)
        if self.dense_tokens == "head":
            tokens = self.model.visual_model.head(tokens)
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
        converted = convert_official_trunk(self.model, trunk)
        rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
        return {**rest, **{prefix + k: v for k, v in converted.items()}}


def convert_official_trunk(
    model: DinoTxtModel, backbone_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Official DINOv3 trunk keys -> ours: timm's DINOv3 conversion, plus the stored RoPE
    periods (``rope_embed.periods`` -> ``rope.periods``), which timm's conversion drops."""
    converted = eva.checkpoint_filter_fn(backbone_state, model.visual_model.backbone)
    if OFFICIAL_PERIODS in backbone_state:
        converted[TIMM_PERIODS] = backbone_state[OFFICIAL_PERIODS]
    return converted


def official_state(
    model: DinoTxtModel,
    backbone_state: dict[str, torch.Tensor],
    head_and_text: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` made from the two official files' contents: the backbone
    file's keys through :func:`convert_official_trunk`, under ``visual_model.backbone.``; the
    head-and-text file's keys as they are."""
    converted = convert_official_trunk(model, backbone_state)
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
    dense_tokens: str,
    patch_fit: str,
    seed: int = 0,
) -> DinoV3TxtBackbone:
    check_choice("dense_tokens", dense_tokens, DENSE_TOKENS)
    check_choice("patch_fit", patch_fit, PATCH_FITS)
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
    return DinoV3TxtBackbone(
        model.eval(), config, tokenizer, fused_attention, bpe_path, dense_tokens, patch_fit
    )


def dinov3txt(
    config: BackboneConfig,
    pretrained: str | None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    bpe_path: str | None = None,
    dense_tokens: str = "trunk",
    patch_fit: str = "stretch",
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
        dense_tokens,
        patch_fit,
    )


def dinov3txt_tiny(
    config: BackboneConfig,
    pretrained: str | None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    bpe_path: str | None = None,
    dense_tokens: str = "trunk",
    patch_fit: str = "stretch",
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
        dense_tokens,
        patch_fit,
        seed,
    )


register_backbone("dinov3txt", dinov3txt, DINOV3TXT)
register_backbone("dinov3txt-tiny", dinov3txt_tiny, DINOV3TXT_TINY)
