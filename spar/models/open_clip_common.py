"""What the open_clip-based families share: building the model, resolving ``pretrained``, text."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import (
    download_pretrained,
    download_pretrained_from_hf,
    get_pretrained_cfg,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import SettingError
from .base import DenseBackbone, Tokenizer
from .registry import BackboneConfig
from .weights import WeightLoadingError, load_state_dict_strict, looks_like_path, read_state_dict

HF_HUB_PREFIX = "hf-hub:"
HUB_WEIGHT_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 3.0  # a closed network fails the probe at once; a slow one within this


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_hub_file(repo: str, filenames: tuple[str, ...]) -> bool:
    """Whether one of ``filenames`` of hub repository ``repo`` is in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in filenames)


def check_hub_reachable(what: str) -> None:
    """Fail fast, before a download that would otherwise retry for about a minute, when the hub
    cannot be reached: one connection attempt of at most :data:`HUB_PROBE_SECONDS`. Skipped
    under ``HF_HUB_OFFLINE=1`` (the hub library then fails at once by itself).

    Raises:
        WeightLoadingError: naming ``what`` and the ways around it (a local weight file, the
            offline ``tiny`` backbone).
    """
    if _hub_offline():
        return
    try:
        socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        raise WeightLoadingError(
            f"cannot download {what}: {HUB_HOST} is unreachable ({error}) and the file is not in "
            "the local hub cache; pass pretrained=<a local weight file>, or use "
            "create_backbone('tiny') offline"
        ) from None


def create_open_clip_model(
    model_name: str | None,
    pretrained: str | None,
    build: Callable[[], nn.Module] | None = None,
    quick_gelu: bool = False,
) -> nn.Module:
    """Build an open_clip model and fill it according to ``pretrained``.

    Every file, whether a tag's, a hub repository's or a local one, is read by
    :func:`~spar.models.weights.read_state_dict` and must fit the model exactly.

    Args:
        model_name: open_clip architecture name (e.g. ``"ViT-B-16"``) whose pretrained tags are
            accepted; ``None`` for custom architectures, which have no tags.
        pretrained: ``None`` (random init), an open_clip pretrained tag of ``model_name``, an
            ``hf-hub:org/repo`` id holding open_clip weights, or a local state-dict /
            safetensors file with open_clip parameter names.
        build: builds the randomly initialised architecture; defaults to
            ``open_clip.create_model(model_name)``.
        quick_gelu: ``build`` makes a QuickGELU model (no warning for a QuickGELU tag).
    """
    if build is None and model_name is None:
        raise ValueError("create_open_clip_model needs a model_name or a build function")
    build = build or (lambda: open_clip.create_model(model_name, pretrained=None))
    if pretrained is None:
        return build()
    if pretrained.startswith(HF_HUB_PREFIX):
        path = download_from_hub(pretrained)
    elif Path(pretrained).is_file():
        path = pretrained
    elif looks_like_path(pretrained):
        raise WeightLoadingError(f"pretrained weight file not found: {pretrained}")
    else:
        path = download_tag(model_name, pretrained, quick_gelu)
    state = read_state_dict(path)  # before building: an unreadable file fails fast
    model = build()
    load_state_dict_strict(model, state, source=str(path))
    return model


def download_tag(model_name: str | None, tag: str, quick_gelu: bool = False) -> str:
    """Fetch the weight file of open_clip's pretrained ``tag`` of ``model_name``; its local path.

    An unknown tag raises ``ValueError`` listing the known ones. Like ``open_clip.create_model``,
    this warns when the tag was trained with QuickGELU (``openai``, ``dfn2b``, ``metaclip_*``):
    the model is built as open_clip builds it for ``model_name``, with GELU, unless
    ``quick_gelu`` says the caller built it with QuickGELU.
    """
    tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name else []
    if tag not in tags:
        raise ValueError(
            f"unknown pretrained tag {tag!r} for open_clip {model_name or 'custom model'}; "
            f"known tags: {', '.join(tags) or '(none)'}; or give an hf-hub: id or a local "
            "weight file"
        )
    cfg = get_pretrained_cfg(model_name, tag)
    if cfg.get("quick_gelu", False) and not quick_gelu:
        warnings.warn(
            f"open_clip tag {tag!r} was trained with QuickGELU; {model_name} uses GELU",
            UserWarning,
            stacklevel=2,
        )
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub and not _cached_hub_file(hub, HUB_WEIGHT_FILENAMES):
        check_hub_reachable(f"the {tag!r} weights of open_clip {model_name}")
    try:
        return download_pretrained(cfg)
    except Exception as error:  # noqa: BLE001 - re-raised naming the tag
        raise WeightLoadingError(
            f"cannot download the {tag!r} weights of open_clip {model_name}: {error}"
        ) from error


def download_from_hub(hub_id: str) -> str:
    """Fetch an open_clip weight file from ``hf-hub:org/repo`` and return its local path."""
    repo = hub_id[len(HF_HUB_PREFIX) :]
    if not _cached_hub_file(repo, HUB_WEIGHT_FILENAMES):
        check_hub_reachable(f"weights from {hub_id}")
    errors = []
    for filename in HUB_WEIGHT_FILENAMES:
        try:
            return download_pretrained_from_hf(repo, filename=filename)
        except Exception as error:  # noqa: BLE001 - try the next file name, report all at the end
            errors.append(f"{filename}: {error}")
    raise WeightLoadingError(f"cannot download weights from {hub_id}: " + "; ".join(errors))


def open_clip_model_config(architecture: str) -> dict:
    """open_clip's configuration of ``architecture`` (its JSON file as a dict).

    Raises:
        SettingError: ``architecture`` is not an open_clip model name.
    """
    config = open_clip.get_model_config(architecture)
    if config is None:
        raise SettingError(
            f"backbone.architecture {architecture!r} is not an open_clip model; "
            "open_clip.list_models() lists them (e.g. ViT-B-16, ViT-L-14, ViT-L-14-336)"
        )
    return config


def tag_config(architecture: str | None, pretrained: str | None) -> dict:
    """open_clip's pretrained configuration of tag ``pretrained`` of ``architecture``; ``{}``
    when ``pretrained`` is not one of its tags (``None``, a file, an ``hf-hub:`` id)."""
    if architecture is None or pretrained is None:
        return {}
    if pretrained not in open_clip.list_pretrained_tags_by_model(architecture):
        return {}
    return get_pretrained_cfg(architecture, pretrained)


def normalisation(
    model: nn.Module, architecture: str | None, pretrained: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's open_clip configuration: the pretrained tag's; without a tag,
    the one every tag of ``architecture`` shares; otherwise the model's preprocess config (open_clip
    fills in OpenAI's values)."""
    tag = tag_config(architecture, pretrained)
    if not tag and architecture is not None:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        pairs = {
            (tuple(c["mean"]), tuple(c["std"]))
            for c in (get_pretrained_cfg(architecture, t) for t in tags)
            if "mean" in c and "std" in c
        }
        if len(pairs) == 1:
            return pairs.pop()
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean = tag.get("mean") or preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = tag.get("std") or preprocess.get("std") or open_clip.OPENAI_DATASET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def describe_model(
    base: BackboneConfig,
    model: nn.Module,
    architecture: str | None,
    pretrained: str | None,
    *,
    patch_size: int,
    embed_dim: int,
) -> BackboneConfig:
    """``base`` with what the built open_clip ``model`` says: its native (square) image size,
    ``patch_size``, ``embed_dim`` and normalisation (:func:`normalisation`)."""
    size = open_clip.get_model_preprocess_cfg(model).get("size") or model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise TypeError(f"{architecture or 'the model'} has a non-square image size {size}")
    mean, std = normalisation(model, architecture, pretrained)
    return dataclasses.replace(
        base,
        architecture=architecture,
        native_size=int(height),
        patch_size=int(patch_size),
        embed_dim=int(embed_dim),
        mean=mean,
        std=std,
    )


def seeded(build: Callable[..., nn.Module], seed: int, *args, **kwargs) -> Callable[[], nn.Module]:
    """A builder calling ``build(*args, **kwargs)`` with the RNG seeded, leaving the global RNG
    untouched."""

    def build_seeded() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(*args, **kwargs)

    return build_seeded


@contextlib.contextmanager
def attention_backend(fused: bool = True) -> Iterator[None]:
    """Route every attention through ``F.scaled_dot_product_attention``.

    open_clip's ``nn.MultiheadAttention`` would otherwise take PyTorch's "fast path" at inference
    (its own kernel, slower than SDPA's flash/memory-efficient kernels: 5.0 s against 3.5 s for
    ViT-B/16 at 672x896 on 2 CPU cores); timm already calls SDPA. ``fused=False`` restricts SDPA
    to its plain math kernel: the reference the fused kernels are checked against.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if fused:
            yield
        else:
            with sdpa_kernel(SDPBackend.MATH):
                yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


class OpenClipBackbone(DenseBackbone):
    """A dense backbone wrapping a whole open_clip model (vision and text towers) as ``model``.

    Parameter names are ``model.<open_clip parameter name>``. Subclasses implement the dense
    vision path (``forward_padded``) and ``blocks``.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP``.
        config: the registry entry's configuration: normalisation and native size.
        embed_dim: joint-space dimension.
        patch_size: side of a square patch in pixels.
        tokenizer: ``list[str] -> (N, L)`` token ids; ``None`` builds ``tokenizer_name``'s
            open_clip tokenizer for the model's context length on first use (which may need a
            hub download for SigLIP2).
        tokenizer_name: open_clip model name whose tokenizer to build lazily.
        fused_attention: run attention through SDPA's fused kernels (default) or, for
            reference, its math kernel (see :func:`attention_backend`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: BackboneConfig,
        *,
        embed_dim: int,
        patch_size: int,
        tokenizer: Tokenizer | None,
        tokenizer_name: str,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.native_size = (config.native_size, config.native_size)
        self.mean, self.std = config.mean, config.std
        self._tokenizer = tokenizer
        self._tokenizer_name = tokenizer_name
        self.fused_attention = fused_attention

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, ceil(H/p), ceil(W/p)) dense features."""
        with attention_backend(self.fused_attention):
            return super().forward(images)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(
                self._tokenizer_name, context_length=self.model.context_length
            )
        return self._tokenizer

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, C) text embeddings (not normalised)."""
        return self.model.encode_text(tokens, normalize=False)
