"""The dino.txt model: the DINOv3 trunk (timm), the vision head and the text tower.

Module and parameter names are the official ones (``visual_model.backbone``,
``visual_model.head``, ``text_model.backbone``, ``text_model.head``, ``logit_scale``), so the
official head-and-text file loads as it is. The trunk is a timm model with timm's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import nn

from .base import Tokenizer


@dataclass(frozen=True)
class DinoTxtArchitecture:
    """Layer sizes (defaults: the official ViT-L/16 dino.txt, text encoder ``tet1280d20h24l``)."""

    width: int = 1024
    depth: int = 24
    heads: int = 16
    head_blocks: int = 2
    text_width: int = 1280
    text_heads: int = 20
    text_layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def embed_dim(self) -> int:
        """Width of the joint space: [class token, mean patch token] concatenated."""
        return 2 * self.width


class LayerScale(nn.Module):
    """(..., D) -> (..., D) scaled per channel by ``gamma``."""

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
        """(B, N, D) -> (B, N, D)."""
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
        """(..., D) -> (..., D)."""
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
        """(B, N, D) -> (B, N, D)."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionHead(nn.Module):
    """``blocks`` head blocks, then a LayerNorm."""

    def __init__(self, dim: int, heads: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VisionHeadBlock(dim, heads) for _ in range(blocks))
        self.ln_final = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) trunk tokens (class, registers, patches) -> (B, N, D)."""
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
        """(B, L, D) -> (B, L, D)."""
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TextTransformer(nn.Module):
    """Token and learned position embeddings, causal blocks, a final LayerNorm."""

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
        """(N, L) token ids -> (N, L, text_width)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class TextHead(nn.Module):
    """Holds the text projection (text_width -> embed_dim) under its official name."""

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
        """(N, L) token ids -> (N, embed_dim)."""
        x = self.head.linear_projection(self.backbone(tokens))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]


class StoredPeriodsRope(RotaryEmbeddingDinoV3):
    """timm's DINOv3 rotary embedding whose ``periods`` (D_head / 4,) are a persistent float32
    buffer: loaded from the state dict and kept through dtype casts.

    The official backbone file stores ``rope_embed.periods`` rounded to bf16, and Meta's
    ``RopePositionEmbedding`` (facebookresearch/dinov3 ``dinov3/layers/rope_position_encoding.py``,
    commit 6876159) computes the angles with those stored values. timm instead drops them and
    recomputes the periods in float32 (also after every cast to a lower precision), which moves
    the features by about 3e-3 relative. Here the buffer holds whatever was loaded; a cast of the
    module (``.to(torch.bfloat16)``, ``.half()``, ``.float()``) moves it to the new device but
    leaves its float32 values alone, so the angles are always computed from the loaded periods in
    float32.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("periods", self.periods, persistent=True)

    @classmethod
    def like(cls, rope: RotaryEmbeddingDinoV3) -> StoredPeriodsRope:
        """A copy of timm's ``rope`` (same settings and periods) with stored periods."""
        if rope.feat_shape is not None:
            raise ValueError("stored RoPE periods need a dynamic-size trunk (no cached grid)")
        copy = cls(
            dim=rope.dim,
            temperature=rope.temperature,
            min_period=rope.min_period,
            max_period=rope.max_period,
            normalize_coords=rope.normalize_coords,
            grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing,
            rotate_half=rope.rotate_half,
            shift_coords=rope.shift_coords,
            jitter_coords=rope.jitter_coords,
            rescale_coords=rope.rescale_coords,
            device=rope.periods.device,
        )
        copy.periods.copy_(rope.periods)
        return copy

    def _apply(self, fn, recurse: bool = True):
        stored = self.periods
        nn.Module._apply(self, fn, recurse)  # not timm's, which recomputes downcast periods
        moved = self.periods
        if moved.dtype != stored.dtype:
            source = moved if stored.is_meta else stored
            self.periods = source.to(device=moved.device, dtype=stored.dtype)
        return self


class VisionModel(nn.Module):
    """The timm trunk ``trunk`` at the architecture's size (any input size), then the head.

    The trunk's rotary embedding is a :class:`StoredPeriodsRope`: its periods are part of the
    state dict (``visual_model.backbone.rope.periods``).
    """

    def __init__(self, arch: DinoTxtArchitecture, trunk: str, image_size: int) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            trunk,
            pretrained=False,
            embed_dim=arch.width,
            depth=arch.depth,
            num_heads=arch.heads,
            img_size=image_size,
            dynamic_img_size=True,
            num_classes=0,
        )
        self.backbone.rope = StoredPeriodsRope.like(self.backbone.rope)
        self.head = VisionHead(arch.width, arch.heads, arch.head_blocks)


class DinoTxtModel(nn.Module):
    """The dino.txt model with the official module names.

    Args:
        arch: layer sizes.
        trunk: timm name of the DINOv3 trunk.
        image_size: the trunk's native input size (it accepts any size).
    """

    def __init__(self, arch: DinoTxtArchitecture, trunk: str, image_size: int) -> None:
        super().__init__()
        self.arch = arch
        self.visual_model = VisionModel(arch, trunk, image_size)
        self.text_model = TextTower(arch)
        self.logit_scale = nn.Parameter(torch.tensor([2.6592]))


def clip_bpe_tokenizer(context_length: int, bpe_path: str | Path | None = None) -> Tokenizer:
    """CLIP's BPE tokenizer, as dino.txt uses it: lower-cased, ``context_length`` tokens,
    end-of-text the largest id.

    The vocabulary is ``bpe_simple_vocab_16e6.txt.gz``, the file dino.txt downloads; open_clip
    ships it (MIT licence), or ``bpe_path`` names a local copy.
    """
    if bpe_path is not None and not Path(bpe_path).is_file():
        raise FileNotFoundError(f"BPE vocabulary not found: {bpe_path}")
    return open_clip.tokenizer.SimpleTokenizer(
        bpe_path=str(bpe_path or open_clip.tokenizer.default_bpe()), context_length=context_length
    )
