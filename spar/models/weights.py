"""Reading weight files and loading them strictly, with errors that name what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HF_HUB_PREFIX = "hf-hub:"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HUB_WEIGHT_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightLoadingError(ValueError):
    """A weight file is missing, unreadable, or its keys or shapes do not fit the model."""


def looks_like_path(value: str) -> bool:
    """True for strings that are meant as a file path rather than a pretrained tag."""
    return "/" in value or "\\" in value or value.endswith(WEIGHT_FILE_SUFFIXES)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file.

    A ``torch.save`` file may hold the state dict itself or nest it under ``"state_dict"`` or
    ``"model"``; a ``"module."`` prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightLoadingError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightLoadingError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, partial: bool = False
) -> None:
    """Load ``state`` into ``module``; on any mismatch raise one error listing all problems.

    Args:
        module: the model to fill.
        state: parameter name -> tensor.
        source: where the weights came from (a file name), quoted in the error.
        partial: ``state`` may cover only part of the module (e.g. the trained blocks of a
            SPAR checkpoint); its keys and shapes must still all fit.
    """
    expected = module.state_dict()
    missing = [] if partial else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_summarise(wrong_shape)}")
    if problems:
        raise WeightLoadingError(
            f"weights from {source} do not fit the model; " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=not partial)


def download_from_hub(hub_id: str) -> str:
    """Fetch an open_clip weight file from ``hf-hub:org/repo`` and return its local path."""
    from open_clip.pretrained import download_pretrained_from_hf

    repo = hub_id[len(HF_HUB_PREFIX) :] if hub_id.startswith(HF_HUB_PREFIX) else hub_id
    errors = []
    for filename in HUB_WEIGHT_FILENAMES:
        try:
            return download_pretrained_from_hf(repo, filename=filename)
        except Exception as error:  # noqa: BLE001 - try the next file name, report all at the end
            errors.append(f"{filename}: {error}")
    raise WeightLoadingError(f"cannot download weights from {hub_id}: " + "; ".join(errors))
