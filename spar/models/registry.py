"""One registry of named backbones with default pretrained weights."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import DenseBackbone, TrainableBlocks
from .checkpoint import load_any_checkpoint

_DEFAULT = object()  # "use the backbone's default pretrained weights"


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: ``factory(pretrained=..., **overrides) -> DenseBackbone``."""

    name: str
    factory: Callable[..., DenseBackbone]
    default_pretrained: str | None
    description: str


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, default_pretrained: str | None, description: str):
    """Decorator registering a backbone factory under ``name``."""

    def decorator(factory: Callable[..., DenseBackbone]) -> Callable[..., DenseBackbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = BackboneEntry(name, factory, default_pretrained, description)
        return factory

    return decorator


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
    trainable_blocks: TrainableBlocks = "last-2",
    checkpoint: str | Path | None = None,
    **overrides,
) -> DenseBackbone:
    """Create a registered backbone, in eval mode.

    Args:
        name: one of ``list_backbones()``.
        pretrained: left out for the backbone's default weights; ``None`` for random
            initialisation; otherwise an open_clip pretrained tag, an ``hf-hub:org/repo`` id or a
            local weight file (state dict or safetensors).
        trainable_blocks: which vision blocks keep ``requires_grad``: ``"last-N"`` (default
            ``"last-2"``), ``"all"``, ``"none"`` or a list of block indices.
        checkpoint: a SPAR checkpoint (``.safetensors`` written by training, loaded on top of
            the pretrained weights; it must have been trained for backbone ``name``) or released
            SPAR weights (Lightning ``.ckpt`` or a plain ``model.*`` state dict; whole model).
        **overrides: family-specific options (e.g. ``tokenizer=`` for offline text encoding,
            ``width=``/``depth=`` for the tiny models).
    """
    entry = backbone_entry(name)
    if pretrained is _DEFAULT:
        pretrained = entry.default_pretrained
    options = set(inspect.signature(entry.factory).parameters) - {"pretrained"}
    unknown = sorted(set(overrides) - options)
    if unknown:
        raise TypeError(
            f"backbone {name!r} has no option(s) {', '.join(unknown)}; its options: "
            f"{', '.join(sorted(options)) or '(none)'}"
        )
    backbone = entry.factory(pretrained=pretrained, **overrides)
    backbone.identity = {
        "name": name,
        "pretrained": pretrained,
        "options": {k: v for k, v in overrides.items() if _is_json(v)},
    }
    if checkpoint is not None:
        load_any_checkpoint(backbone, checkpoint, expected_name=name)
    backbone.set_trainable_blocks(trainable_blocks)
    return backbone.eval()


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
