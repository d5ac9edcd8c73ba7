"""One registry of named backbones, each with its pretrained configuration."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import DenseBackbone, TrainableBlocks
from .checkpoint import load_any_checkpoint
from .compiling import CompileSetting, check_compile_setting, compile_backbone
from .weights import WeightLoadingError


class _DefaultWeights:
    """The ``pretrained`` default of :func:`create_backbone`: the backbone's own default
    weights (shown as ``pretrained='default'`` by ``help``)."""

    def __repr__(self) -> str:
        return "'default'"


_DEFAULT = _DefaultWeights()


@dataclass(frozen=True)
class BackboneConfig:
    """What a registered backbone is, as timm's ``PretrainedCfg`` describes a model.

    The families read ``mean``, ``std`` and ``native_size`` from here; ``patch_size`` and
    ``embed_dim`` are what the built model has with the factory's default options (the
    contract tests check both). A factory building another ``architecture=`` than the default
    (``clip``, ``siglip2``) passes its backbone a copy with the values read from open_clip's
    configuration and the built model
    (:func:`~spar.models.open_clip_common.describe_model`).

    Attributes:
        description: one line for listings.
        default_pretrained: weights used when ``pretrained`` is left out (an open_clip tag,
            ``"official"``) or ``None`` for a random, seeded model that runs offline.
        mean, std: per-channel input normalisation of the pretrained weights.
        native_size: side of the square pretraining resolution, the teacher's window.
        patch_size: side of a square patch in pixels.
        embed_dim: dimension C of the dense features and text embeddings.
        architecture: the named model the family builds: an open_clip model name (whose
            pretrained tags and tokenizer are used) or timm's trunk name; ``None`` for a tiny
            model built from its own small configuration.
        license: the licence of the default weights, if any.
    """

    description: str
    default_pretrained: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int
    embed_dim: int
    patch_size: int = 16
    architecture: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: ``factory(config, pretrained=..., **options) -> DenseBackbone``."""

    name: str
    factory: Callable[..., DenseBackbone]
    config: BackboneConfig

    @property
    def default_pretrained(self) -> str | None:
        return self.config.default_pretrained

    @property
    def options(self) -> list[str]:
        """The factory's options, i.e. the keyword arguments ``create_backbone`` accepts."""
        names = inspect.signature(self.factory).parameters
        return sorted(set(names) - {"config", "pretrained"})


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str, factory: Callable[..., DenseBackbone], config: BackboneConfig
) -> None:
    """Register ``factory(config, pretrained=..., **options)`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = BackboneEntry(name, factory, config)


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def backbone_entry(name: str) -> BackboneEntry:
    """The registry entry of ``name``; ``KeyError`` listing the known names otherwise."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    return _REGISTRY[name]


def create_backbone(
    name: str,
    pretrained: str | None = _DEFAULT,  # type: ignore[assignment]
    *,
    trainable_blocks: TrainableBlocks = "none",
    checkpoint: str | Path | None = None,
    compile: CompileSetting = False,
    **overrides,
) -> DenseBackbone:
    """Create a registered backbone, in eval mode.

    Args:
        name: one of ``list_backbones()``.
        pretrained: left out for the backbone's default weights; ``None`` for random
            initialisation; otherwise an open_clip pretrained tag, an ``hf-hub:org/repo`` id or a
            local weight file (state dict or safetensors).
        trainable_blocks: which vision blocks keep ``requires_grad``: ``"none"`` (default:
            inference builds no autograd graph), ``"last-N"`` (the training configs use
            ``"last-2"``, the paper's), ``"all"`` or a list of block indices.
        checkpoint: a SPAR checkpoint (``.safetensors`` written by training, loaded on top of
            the pretrained weights; it must have been trained for backbone ``name``) or released
            SPAR weights (Lightning ``.ckpt`` or a plain ``model.*`` state dict; whole model).
        compile: ``torch.compile`` the transformer blocks, once for every image size (see
            :mod:`spar.models.compiling`): ``False``, ``True``, ``"reduce-overhead"`` or
            ``"max-autotune"``. Deep copies (a teacher's low-precision copy) run eagerly.
        **overrides: family-specific options (e.g. ``tokenizer=`` for offline text encoding,
            ``width=``/``depth=`` for the tiny models).
    """
    entry = backbone_entry(name)
    check_compile_setting(compile)
    if pretrained is _DEFAULT:
        pretrained = entry.default_pretrained
    unknown = sorted(set(overrides) - set(entry.options))
    if unknown:
        raise TypeError(
            f"backbone {name!r} has no option(s) {', '.join(unknown)}; its options: "
            f"{', '.join(entry.options) or '(none)'}"
        )
    backbone = entry.factory(entry.config, pretrained=pretrained, **overrides)
    backbone.identity = {
        "name": name,
        "pretrained": pretrained,
        "options": {k: v for k, v in overrides.items() if _is_json(v)},
    }
    if checkpoint is not None:
        loaded = load_any_checkpoint(backbone, checkpoint, expected_name=name)
        if loaded.get("format") == "spar":
            check_checkpoint_dense_head(loaded, backbone, checkpoint)
    backbone.set_trainable_blocks(trainable_blocks)
    return compile_backbone(backbone.eval(), compile)


def check_checkpoint_dense_head(metadata: dict, backbone: DenseBackbone, path) -> None:
    """A SPAR checkpoint's student was trained to reproduce one dense head's maps: refuse to
    load it under another (checkpoints that name no head were trained with ``maskclip``).

    Raises:
        WeightLoadingError: naming both heads and the option that loads it.
    """
    current = getattr(backbone, "dense_head", None)
    if current is None:
        return
    options = (metadata.get("backbone") or {}).get("options") or {}
    saved = options.get("dense_head", "maskclip")
    if saved != current:
        raise WeightLoadingError(
            f"checkpoint {path} was trained with dense_head {saved!r}, not {current!r}; "
            f"load it with dense_head={saved!r} (backbone.dense_head={saved})"
        )


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
