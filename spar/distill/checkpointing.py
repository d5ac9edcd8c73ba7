"""Training checkpoints: ``last``/``best`` weights and the state a resumed run continues from.

A run directory's ``checkpoints/`` holds ``last.safetensors`` (the trained parameters and
metadata, see ``spar.models.checkpoint``), ``last.state.pt`` (optimizer, scheduler, loss scaler,
counters, RNG states, and a copy of the trained parameters) and ``best.safetensors``. The state
file holds only tensors and plain values, so it is read without running code
(``spar.models.weights.read_weight_file``).

The two ``last`` files are written one after the other, so a kill between the writes leaves a
pair from different steps. Both record the same ``pair`` token (step and a random suffix), and
the state is written first and holds the trained parameters itself: a resume always continues
from the state file alone (one atomic file), and reports a ``last.safetensors`` that does not
belong with it (rewritten at the next checkpoint).
"""

from __future__ import annotations

import io
import json
import random
import secrets
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import atomic_write_bytes
from ..models.checkpoint import load_checkpoint, save_checkpoint, trainable_state_dict
from ..models.weights import (
    WeightLoadingError,
    check_finite_tensors,
    load_state_dict_strict,
    read_safetensors_metadata,
    read_weight_file,
)
from ..utils import check_finite_before_saving

STATE_KEYS = ("state", "optimizer", "scheduler", "scaler", "rng", "total_steps")


def resolve_resume_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, training state) files of a run directory, checkpoint directory or file.

    Only the state file must exist: it holds the trained parameters too (the weights file may be
    missing after a kill between the two writes of the first checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"cannot resume: {path} not found (resume= takes a run directory, its checkpoints/ "
            "directory or a last.safetensors with last.state.pt beside it)"
        )
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = directory / "last.safetensors"
    if path.name.endswith(".state.pt"):
        path = path.with_name(path.name[: -len(".state.pt")] + ".safetensors")
    state = path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")
    if not state.is_file():
        raise FileNotFoundError(
            f"cannot resume: {state} not found (resume= takes a run directory, its "
            "checkpoints/ directory or a last.safetensors with last.state.pt beside it)"
        )
    return path, state


def check_resumable(path: str | Path) -> None:
    """Fail now, naming the file, when ``resume=path`` could not be resumed: the state file is
    missing, unreadable (e.g. truncated) or not a SPAR training state."""
    _read_state(resolve_resume_paths(path)[1])


def read_recorded_provenance(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(state file, the fingerprint its run recorded) of ``resume=path``; the fingerprint is
    ``None`` for a state written before fingerprints were recorded (see
    ``spar.distill.fingerprint``)."""
    state_path = resolve_resume_paths(path)[1]
    extra = _read_state(state_path).get("extra")
    fingerprint = extra.get("fingerprint") if isinstance(extra, dict) else None
    return state_path, fingerprint


def save_training_checkpoint(
    directory: Path,
    student: nn.Module,
    extra: dict[str, Any],
    training_state: dict[str, Any],
    *,
    best: bool = False,
) -> None:
    """Write ``last.state.pt`` (``training_state``: every entry of :data:`STATE_KEYS` but
    ``rng``, which is taken here, plus ``student``'s trained parameters), then
    ``last.safetensors`` (the parameters and ``extra``), and ``best.safetensors`` too when
    ``best``. The files record the same ``pair`` token; the state also records ``extra`` and
    ``best``, so that a resume can finish a save that a kill interrupted."""
    pair = f"{extra.get('step', '?')}-{secrets.token_hex(6)}"
    identity = getattr(student, "identity", None) or {}
    parameters = trainable_state_dict(student)
    step = f" at step {extra['step']}" if "step" in extra else ""
    check_finite_before_saving(parameters, f"{directory}{step}")
    # What resume_training needs to finish this save if a kill interrupts it after the state.
    own = {
        "weights": parameters,
        "pair": pair,
        "backbone": identity.get("name"),
        "extra": extra,
        "best": best,
    }
    atomic_write_bytes(directory / "last.state.pt", _state_bytes({**training_state, **own}))
    save_checkpoint(directory / "last.safetensors", student, {**extra, "pair": pair})
    if best:
        save_checkpoint(directory / "best.safetensors", student, {**extra, "pair": pair})


def resume_training(path: str | Path, student: nn.Module) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``student``, restore the global RNG states saved
    with it and return its training state (the entries of :data:`STATE_KEYS`).

    ``path`` is a run directory, its ``checkpoints/`` directory or a ``.safetensors``
    checkpoint with its ``.state.pt`` beside it. The parameters come from the state file. A
    ``last.safetensors`` (or, when that save also wrote it, ``best.safetensors``) whose ``pair``
    token differs, is missing or unreadable (a kill between the writes, or a file copied from
    another step) is reported with a warning naming it and rewritten from the state: the save
    the kill interrupted is finished.

    Raises:
        FileNotFoundError: a file is missing (named).
        WeightLoadingError: the state file is unreadable (e.g. truncated) or not a SPAR training
            state, would run code, or belongs to another backbone; the message names the file.
    """
    weights, state_path = resolve_resume_paths(path)
    saved = _read_state(state_path)
    if "weights" not in saved:  # a state written before the pair token: the weights file
        load_checkpoint(student, weights)
    else:
        _check_backbone(saved.get("backbone"), student, state_path)
        source = f"training state {state_path}"
        load_state_dict_strict(student, saved["weights"], source=source, partial=True)
        _finish_interrupted_save(weights, state_path, saved, student)
    _restore_rng_states(saved["rng"])
    return saved


def _check_backbone(saved_name: str | None, student: nn.Module, path: Path) -> None:
    expected = (getattr(student, "identity", None) or {}).get("name")
    if saved_name is not None and expected is not None and saved_name != expected:
        raise WeightLoadingError(
            f"training state {path} was written for backbone {saved_name!r}, not {expected!r}"
        )


def _pair_of(path: Path) -> str:
    """The ``pair`` token of a checkpoint file, or why there is none."""
    try:
        return json.loads(read_safetensors_metadata(path).get("extra", "{}")).get("pair")
    except (WeightLoadingError, ValueError) as error:
        return f"unreadable ({error})"


def _finish_interrupted_save(
    weights: Path, state_path: Path, saved: dict[str, Any], student: nn.Module
) -> None:
    """Rewrite, from the state's parameters (loaded in ``student``), the checkpoint files of the
    state's save that do not carry its ``pair`` token; each one is reported."""
    files = [weights]
    if saved.get("best") and weights.name == "last.safetensors":
        files.append(weights.with_name("best.safetensors"))
    for path in files:
        found = _pair_of(path)
        if found == saved["pair"]:
            continue
        warnings.warn(
            f"{path} (pair {found!r}) does not belong with {state_path} (pair "
            f"{saved['pair']!r}), e.g. the run was killed between the checkpoint writes: "
            "resuming from the parameters stored in the state file and rewriting it from them",
            stacklevel=4,
        )
        save_checkpoint(path, student, {**saved["extra"], "pair": saved["pair"]})


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
    # The parameters are checked when loaded; the optimizer moments etc. here (NaN refused).
    check_finite_tensors({k: saved[k] for k in ("optimizer", "scheduler", "scaler")}, str(path))
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
