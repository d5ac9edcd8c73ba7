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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.models import eva
from torch import nn

from .base import DenseBackbone, Tokenizer
from .open_clip_common import attention_backend, seeded
from .registry import register_backbone
from .weights import WeightLoadingError, load_state_dict_strict, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK = "vit_large_patch16_dinov3_qkvb"
OFFICIAL = "official"  # pretrained tag: the two official weight files


@dataclass(frozen=True)
class DinoTxtArchitecture:
    """The official description (defaults: ViT-L/16 dino.txt, ``tet1280d20h24l``)."""

    width: int = 1024
    depth: int = 24
    heads: int = 16
    head_blocks: int = 2
    text_width: int = 1280
    text_heads: int = 20
    text_layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    native_size: int = 384

    @property
    def embed_dim(self) -> int:
        return 2 * self.width


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; ``qkv`` without bias, ``proj`` with."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class SwiGLU(nn.Module):
    """``w3(silu(w1 x) * w2 x)``; hidden size 2/3 of 4 x dim, rounded up to a multiple of 64."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = int(4 * dim * 2 / 3)
        hidden += -hidden % 64
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class VisionHeadBlock(nn.Module):
    """Pre-norm block of the dino.txt vision head (LayerScale on both branches)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = (
            nn.LayerNorm(dim),
            SelfAttention(dim, heads),
            LayerScale(dim),
        )
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), SwiGLU(dim), LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionHead(nn.Module):
    def __init__(self, dim: int, heads: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VisionHeadBlock(dim, heads) for _ in range(blocks))
        self.ln_final = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.ln_final(tokens)


class TextBlock(nn.Module):
    """Causal pre-norm block of the dino.txt text transformer (GELU MLP, no layer scale)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, causal=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential()
        self.feed_forward.add_module("fc1", nn.Linear(dim, 4 * dim))
        self.feed_forward.add_module("act", nn.GELU())
        self.feed_forward.add_module("fc2", nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TextTransformer(nn.Module):
    def __init__(self, arch: DinoTxtArchitecture) -> None:
        super().__init__()
        dim = arch.text_width
        self.token_embedding = nn.Embedding(arch.vocab_size, dim)
        self.positional_embedding = nn.Parameter(torch.randn(arch.context_length, dim) * 0.01)
        self.blocks = nn.ModuleList(
            TextBlock(dim, arch.text_heads) for _ in range(arch.text_layers)
        )
        self.ln_final = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class TextHead(nn.Module):
    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_projection = nn.Linear(width, embed_dim, bias=False)


class TextTower(nn.Module):
    """Text transformer, then the projection of the end-of-text token (the largest token id)."""

    def __init__(self, arch: DinoTxtArchitecture) -> None:
        super().__init__()
        self.backbone = TextTransformer(arch)
        self.head = TextHead(arch.text_width, arch.embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.head.linear_projection(self.backbone(tokens))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


class VisionModel(nn.Module):
    def __init__(self, arch: DinoTxtArchitecture) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            TRUNK,
            pretrained=False,
            embed_dim=arch.width,
            depth=arch.depth,
            num_heads=arch.heads,
            img_size=arch.native_size,
            dynamic_img_size=True,
            num_classes=0,
        )
        self.head = VisionHead(arch.width, arch.heads, arch.head_blocks)


class DinoTxtModel(nn.Module):
    """The dino.txt model with the official module names."""

    def __init__(self, arch: DinoTxtArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.visual_model = VisionModel(arch)
        self.text_model = TextTower(arch)
        self.logit_scale = nn.Parameter(torch.tensor([2.6592]))


class DinoV3TxtBackbone(DenseBackbone):
    """Dense features = the vision head's patch tokens; text = the patch-aligned half."""

    def __init__(
        self,
        model: DinoTxtModel,
        tokenizer: Tokenizer | None,
        fused_attention: bool = True,
        bpe_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        trunk = model.visual_model.backbone
        self.patch_size = trunk.patch_embed.patch_size[0]
        self.embed_dim = model.arch.width
        self.native_size = (model.arch.native_size, model.arch.native_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._tokenizer = tokenizer
        self._bpe_path = bpe_path
        self.fused_attention = fused_attention

    @property
    def tokenizer(self) -> Tokenizer:
        """CLIP's BPE tokenizer, as dino.txt uses it (lower-cased, 77 tokens, end-of-text last).

        The vocabulary is ``bpe_simple_vocab_16e6.txt.gz``, the file dino.txt downloads; open_clip
        ships it (MIT licence), or ``bpe_path=`` names a local copy.
        """
        if self._tokenizer is None:
            if self._bpe_path is not None and not Path(self._bpe_path).is_file():
                raise FileNotFoundError(f"BPE vocabulary not found: {self._bpe_path}")
            bpe_path = str(self._bpe_path or open_clip.tokenizer.default_bpe())
            self._tokenizer = open_clip.tokenizer.SimpleTokenizer(
                bpe_path=bpe_path, context_length=self.model.arch.context_length
            )
        return self._tokenizer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual_model.backbone.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with attention_backend(self.fused_attention):
            return super().forward(images)

    def forward_padded(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of 16 -> (B, width, H/16, W/16)."""
        trunk = self.model.visual_model.backbone
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        tokens = self.model.visual_model.head(trunk.forward_features(images))
        patches = tokens[:, trunk.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(images.shape[0], -1, *grid)

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


def load_official_weights(
    model: DinoTxtModel, backbone_weights: str | Path, weights: str | Path
) -> None:
    """Fill ``model`` from the official backbone file and the head-and-text-encoder file.

    The two files together must cover the model exactly (after the trunk's key conversion);
    otherwise the error lists what is missing, unexpected or mis-shaped.
    """
    trunk = model.visual_model.backbone
    backbone_state = read_state_dict(backbone_weights)
    if "storage_tokens" not in backbone_state:
        raise WeightLoadingError(
            f"{backbone_weights} does not look like an official DINOv3 backbone file "
            "(no 'storage_tokens'); expected dinov3_vitl16_pretrain_lvd1689m-*.pth"
        )
    converted = eva.checkpoint_filter_fn(backbone_state, trunk)
    head_and_text = read_state_dict(weights)
    state = {f"visual_model.backbone.{k}": v for k, v in converted.items()}
    state.update(head_and_text)
    load_state_dict_strict(
        model, state, source=f"{Path(backbone_weights).name} + {Path(weights).name}"
    )


def _build(
    arch: DinoTxtArchitecture,
    pretrained: str | None,
    backbone_weights: str | Path | None,
    weights: str | Path | None,
    tokenizer: Tokenizer | None,
    fused_attention: bool,
    bpe_path: str | None = None,
    seed: int = 0,
) -> DinoV3TxtBackbone:
    model = seeded(DinoTxtModel, seed, arch)()
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
    return DinoV3TxtBackbone(model.eval(), tokenizer, fused_attention, bpe_path)


@register_backbone(
    "dinov3txt",
    default_pretrained=OFFICIAL,
    description="DINOv3 ViT-L/16 + dino.txt head and text tower (official files), window 384",
)
def dinov3txt(
    pretrained: str | None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    bpe_path: str | None = None,
) -> DinoV3TxtBackbone:
    return _build(
        DinoTxtArchitecture(),
        pretrained,
        backbone_weights,
        weights,
        tokenizer,
        fused_attention,
        bpe_path,
    )


TINY_ARCHITECTURE = DinoTxtArchitecture(
    width=64, depth=4, heads=4, text_width=64, text_heads=2, text_layers=2, native_size=128
)


@register_backbone(
    "dinov3txt-tiny",
    default_pretrained=None,
    description="tiny random DINOv3.txt layout on the dinov3txt code path, for tests",
)
def dinov3txt_tiny(
    pretrained: str | None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    tokenizer: Tokenizer | None = None,
    fused_attention: bool = True,
    bpe_path: str | None = None,
    seed: int = 0,
) -> DinoV3TxtBackbone:
    return _build(
        TINY_ARCHITECTURE,
        pretrained,
        backbone_weights,
        weights,
        tokenizer,
        fused_attention,
        bpe_path,
        seed,
    )
