"""Training checkpoints: ``last``/``best`` weights and the state a resumed run continues from.

A run directory's ``checkpoints/`` holds ``last.safetensors`` (the trained parameters and
metadata, see ``spar.models.checkpoint``), ``last.state.pt`` (optimizer, scheduler, loss scaler,
counters, RNG states) and ``best.safetensors``. The state file holds only tensors and plain
values, so it is read without running code (``spar.models.weights.read_weight_file``).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import atomic_write_bytes
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.weights import WeightLoadingError, read_weight_file

STATE_KEYS = ("state", "optimizer", "scheduler", "scaler", "rng", "total_steps")


def resolve_resume_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, training state) files of a run directory, checkpoint directory or file."""
    path = Path(path)
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = directory / "last.safetensors"
    if path.name.endswith(".state.pt"):
        path = path.with_name(path.name[: -len(".state.pt")] + ".safetensors")
    state = path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")
    for required in (path, state):
        if not required.is_file():
            raise FileNotFoundError(
                f"cannot resume: {required} not found (resume= takes a run directory, its "
                "checkpoints/ directory or a last.safetensors with last.state.pt beside it)"
            )
    return path, state


def save_training_checkpoint(
    directory: Path,
    student: nn.Module,
    extra: dict[str, Any],
    training_state: dict[str, Any],
    *,
    best: bool = False,
) -> None:
    """Write ``last.safetensors`` (``student``'s trained parameters and ``extra``) and
    ``last.state.pt`` (``training_state``: every entry of :data:`STATE_KEYS` but ``rng``, which
    is taken here), and ``best.safetensors`` too when ``best``."""
    save_checkpoint(directory / "last.safetensors", student, extra)
    atomic_write_bytes(directory / "last.state.pt", _state_bytes(training_state))
    if best:
        save_checkpoint(directory / "best.safetensors", student, extra)


def resume_training(path: str | Path, student: nn.Module) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``student``, restore the global RNG states saved
    with it and return its training state (the entries of :data:`STATE_KEYS`).

    ``path`` is a run directory, its ``checkpoints/`` directory or a ``.safetensors``
    checkpoint with its ``.state.pt`` beside it.

    Raises:
        FileNotFoundError: a file is missing (named).
        WeightLoadingError: the state file is not a SPAR training state, or would run code.
    """
    weights, state_path = resolve_resume_paths(path)
    load_checkpoint(student, weights)
    saved = _read_state(state_path)
    _restore_rng_states(saved["rng"])
    return saved


def _state_bytes(training_state: dict[str, Any]) -> bytes:
    """``torch.save`` bytes of the state and the current RNG states, tensors and plain values
    only, so that ``weights_only=True`` reads them."""
    rng = {
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buffer = io.BytesIO()
    torch.save({**training_state, "rng": rng}, buffer)
    return buffer.getvalue()


def _read_state(path: Path) -> dict[str, Any]:
    """The training state written by :func:`_state_bytes`, read without running code."""
    saved = read_weight_file(path)
    if not isinstance(saved, dict) or not set(STATE_KEYS) <= set(saved):
        raise WeightLoadingError(
            f"cannot resume: {path} is not a SPAR training state (expected the entries "
            f"{', '.join(STATE_KEYS)})"
        )
    return saved


def _restore_rng_states(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    _set_numpy_rng_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _numpy_rng_state() -> dict[str, Any]:
    """``np.random.get_state()`` as a tensor and plain values, for ``weights_only``."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "kind": kind,
        "key": torch.from_numpy(key.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_rng_state(saved: dict[str, Any]) -> None:
    """Restore numpy's global RNG from :func:`_numpy_rng_state`'s dict."""
    key = saved["key"].numpy().astype(np.uint32)
    np.random.set_state(
        (saved["kind"], key, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    )
