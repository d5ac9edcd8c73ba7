"""SPAR checkpoints: the trained parameters of a backbone plus who they belong to.

A checkpoint is a safetensors file holding only the parameters that were trained (e.g. the last
two vision blocks), named as in the backbone's ``state_dict``, with JSON metadata: the format
tag, the backbone identity (registry name, pretrained weights, options) and anything the caller
adds (resolved config, step, held-out error). It is loaded on top of the pretrained weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path
from .weights import WeightLoadingError

CHECKPOINT_FORMAT = "spar-checkpoint-v1"


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad``, by their ``state_dict`` names, detached on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def save_checkpoint(
    path: str | Path, backbone: nn.Module, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``backbone``'s trainable parameters and metadata to ``path`` atomically.

    Args:
        path: destination ``.safetensors`` file.
        backbone: the (unwrapped) backbone; its ``identity`` (set by ``create_backbone``) is
            recorded so that loading into another backbone fails clearly.
        extra: JSON-serialisable information stored under ``metadata["extra"]``.
    """
    state = trainable_state_dict(backbone)
    if not state:
        raise ValueError("the backbone has no trainable parameters to save")
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "backbone": json.dumps(getattr(backbone, "identity", None) or {"name": None}),
        "extra": json.dumps(extra or {}),
    }
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a SPAR checkpoint; metadata JSON fields are decoded."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadingError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            raw = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # noqa: BLE001 - re-raised naming the file
        raise WeightLoadingError(f"cannot read checkpoint {path}: {error}") from error
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise WeightLoadingError(
            f"{path} is not a SPAR checkpoint (format {raw.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT!r})"
        )
    metadata = {
        "format": raw["format"],
        "backbone": json.loads(raw.get("backbone", "{}")),
        "extra": json.loads(raw.get("extra", "{}")),
    }
    return tensors, metadata


def load_checkpoint(
    backbone: nn.Module, path: str | Path, expected_name: str | None = None
) -> dict[str, Any]:
    """Load a SPAR checkpoint on top of ``backbone``'s weights; returns its metadata.

    Raises:
        WeightLoadingError: unreadable file, a checkpoint of another backbone (both names are
            given), or parameters the backbone does not have or with other shapes.
    """
    tensors, metadata = read_checkpoint(path)
    saved_name = metadata["backbone"].get("name")
    expected_name = expected_name or (getattr(backbone, "identity", None) or {}).get("name")
    if saved_name is not None and expected_name is not None and saved_name != expected_name:
        raise WeightLoadingError(
            f"checkpoint {path} was trained for backbone {saved_name!r}, not for {expected_name!r}"
        )
    expected = backbone.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in sorted(tensors.items())
        if k in expected and v.shape != expected[k].shape
    ]
    if unexpected or wrong_shape:
        details = "; ".join(
            part
            for part in (
                f"unexpected keys: {', '.join(unexpected[:8])}" if unexpected else "",
                f"shape mismatches: {', '.join(wrong_shape[:8])}" if wrong_shape else "",
            )
            if part
        )
        raise WeightLoadingError(f"checkpoint {path} does not fit the backbone; {details}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = expected[name]
            target.copy_(tensor.to(target.dtype))
    return metadata
