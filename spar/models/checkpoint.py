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
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path
from ..utils import check_finite_before_saving
from .weights import (
    WeightLoadingError,
    load_state_dict_strict,
    read_safetensors_metadata,
    read_safetensors_with_metadata,
    read_weight_file,
)

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

    Raises:
        NonFiniteError: a parameter holds NaN or inf; nothing is written, so the file already at
            ``path`` (an earlier, finite checkpoint) stays.
    """
    state = trainable_state_dict(backbone)
    if not state:
        raise ValueError("the backbone has no trainable parameters to save")
    step = f" at step {extra['step']}" if extra and "step" in extra else ""
    check_finite_before_saving(state, f"{path}{step}")
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
    tensors, raw = read_safetensors_with_metadata(path)
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
            given), parameters the backbone does not have or with other shapes, or holding NaN
            or inf or integers where the backbone's are floating (each named).
    """
    tensors, metadata = read_checkpoint(path)
    saved_name = metadata["backbone"].get("name")
    expected_name = expected_name or (getattr(backbone, "identity", None) or {}).get("name")
    if saved_name is not None and expected_name is not None and saved_name != expected_name:
        raise WeightLoadingError(
            f"checkpoint {path} was trained for backbone {saved_name!r}, not for {expected_name!r}"
        )
    load_state_dict_strict(backbone, tensors, source=f"checkpoint {path}", partial=True)
    return metadata


# -- released SPAR weights ---------------------------------------------------------------------

LIGHTNING_PREFIX = "segmentor.net.model."
MODEL_PREFIX = "model."


def _tensor_dict(value: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
        return tensors or None
    return None


def read_released_weights(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Detect the format of a released SPAR weight file and map its keys onto ours.

    Formats:
        ``lightning``: a PyTorch Lightning ``.ckpt`` whose ``state_dict`` holds the model under
            ``segmentor.net.model.<name>`` (other entries are ignored);
        ``plain``: a state dict (torch file or safetensors) with keys ``model.<name>``.
    ``<name>`` is a parameter name of the open_clip (or dino.txt) model, so both map to our
    ``model.<name>``. The file is read by :func:`~spar.models.weights.read_weight_file`, which
    never runs code from it.

    Returns:
        (format, state dict with our key names).
    """
    content = read_weight_file(path)
    state = _tensor_dict(content.get("state_dict")) if isinstance(content, dict) else None
    if state is not None and any(k.startswith(LIGHTNING_PREFIX) for k in state):
        mapped = {
            MODEL_PREFIX + k[len(LIGHTNING_PREFIX) :]: v
            for k, v in state.items()
            if k.startswith(LIGHTNING_PREFIX)
        }
        return "lightning", mapped
    state = state or _tensor_dict(content)
    if state is not None and any(k.startswith(MODEL_PREFIX) for k in state):
        return "plain", {k: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    sample = ", ".join(list(state or (content if isinstance(content, dict) else {}))[:5])
    raise WeightLoadingError(
        f"{path}: unrecognised checkpoint format (keys start with: {sample or 'nothing'}); "
        f"expected a SPAR checkpoint, a Lightning .ckpt with '{LIGHTNING_PREFIX}*' keys in its "
        f"state_dict, or a state dict with '{MODEL_PREFIX}*' keys"
    )


def is_spar_checkpoint(path: str | Path) -> bool:
    """True for a safetensors file written by :func:`save_checkpoint`."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return read_safetensors_metadata(path).get("format") == CHECKPOINT_FORMAT
    except WeightLoadingError:  # unreadable: not ours; the caller reports it
        return False


def load_any_checkpoint(
    backbone: nn.Module, path: str | Path, expected_name: str | None = None
) -> dict[str, Any]:
    """Load a SPAR checkpoint (ours) or released SPAR weights (Lightning / plain) into ``backbone``.

    Our checkpoints hold the trained parameters only and are loaded on top of the pretrained
    weights; released weights hold the whole model (vision and text) and must fit it exactly.
    Returns ``{"format": ..., ...}``; mismatches raise ``WeightLoadingError`` listing the
    missing, unexpected and mis-shaped keys, then the tensors holding NaN or inf or not
    floating where the backbone's are (see :func:`~spar.models.weights.check_weight_values`).
    """
    if is_spar_checkpoint(path):
        return {**load_checkpoint(backbone, path, expected_name), "format": "spar"}
    fmt, state = read_released_weights(path)
    if hasattr(backbone, "map_released_state"):
        state = backbone.map_released_state(state)
    load_state_dict_strict(backbone, state, source=f"{path} ({fmt} format)")
    return {"format": fmt, "tensors": len(state)}
