"""What a training run is made from, and the check that a resumed run is made from the same.

Every training checkpoint records the run's *fingerprint* (``spar.provenance``): a flat mapping
``dotted key -> value`` of

- the resolved settings that change the trained weights (:data:`IGNORED_SETTINGS` lists those
  that do not: speed, display, where files go, when to stop or checkpoint);
- ``teacher.window``, ``teacher.stride`` (resolved, as ``[h, w]``), ``teacher.dtype`` (the
  dtype the teacher's windows run in) and ``trainer.precision`` (the resolved autocast dtype);
- ``weights``: a content digest of the student's base weights before training (the pretrained
  or initial weights, whatever file or tag they came from);
- ``train_images`` and ``heldout``: the data split, as image lists (relative path, size, mtime).

``resume=`` compares the recorded fingerprint with the new run's before any long work
(:func:`check_resume`); ``resume_allow=[key, ...]`` lets the named keys (or key prefixes) differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import SettingError
from ..provenance import (
    ProvenanceError,
    check_fingerprint,
    image_list_fingerprint,
    settings_fingerprint,
)
from .cache import window_dtype
from .checkpointing import read_recorded_provenance
from .data import ImageSplit

#: Settings that do not change the trained weights, left out of the fingerprint. Stopping and
#: checkpointing points (``stop_after_steps``, ``checkpoint_every``) only decide when the same
#: trajectory pauses, so a run stopped early resumes under other values; ``trainer.epochs``
#: is kept (it spans the learning-rate schedule and the end of training:
#: ``resume_allow=[trainer.epochs]`` extends a run). Paths are left out where a content
#: fingerprint stands for them: ``backbone.pretrained``/``backbone.checkpoint`` (``weights``),
#: ``train_images.root``/``heldout.root`` (the image lists), ``teacher.cache_dir`` (entries are
#: keyed by content).
IGNORED_SETTINGS = (
    "trainer.num_workers",
    "trainer.show_progress",
    "trainer.log_every",
    "trainer.tensorboard",
    "trainer.checkpoint_every",
    "trainer.stop_after_steps",
    "teacher.batch_size",
    "teacher.compile",
    "teacher.cache_dir",
    "backbone.pretrained",
    "backbone.checkpoint",
    "train_images.root",
    "heldout.root",
    "device",
    "compile",
    "tf32",
    "resume",
    "resume_allow",
    "hydra",
)


def training_fingerprint(
    config: Mapping[str, Any],
    *,
    weights: str,
    teacher: nn.Module,
    precision: str,
    split: ImageSplit,
    root: str | Path,
    heldout_root: str | Path,
) -> dict[str, Any]:
    """The fingerprint of a run (see the module docstring).

    Args:
        config: the resolved ``train.yaml`` config (a plain dict).
        weights: ``spar.provenance.weights_digest`` of the student before training.
        teacher: the built sliding-window teacher (its resolved window, stride and dtype).
        precision: the resolved autocast dtype of the student, e.g. ``"float32"``.
        split: the training and held-out images; ``root`` and ``heldout_root`` are their folders.
    """
    fingerprint = settings_fingerprint(config, ignore=IGNORED_SETTINGS)
    fingerprint["teacher.window"] = [int(v) for v in teacher.window]
    fingerprint["teacher.stride"] = [int(v) for v in teacher.stride]
    fingerprint["teacher.dtype"] = window_dtype(teacher).removeprefix("torch.")
    fingerprint["trainer.precision"] = precision
    fingerprint["weights"] = weights
    fingerprint["train_images"] = image_list_fingerprint(split.train, root)
    fingerprint["heldout"] = image_list_fingerprint(split.heldout, heldout_root)
    return fingerprint


def check_resume_allow(config: Mapping[str, Any]) -> list[str]:
    """``resume_allow`` (absent: ``[]``) as a list of dotted keys; it needs ``resume``.

    Raises:
        SettingError: not a list of non-empty strings, or given without ``resume``.
    """
    allow = config.get("resume_allow") or []
    if not isinstance(allow, list | tuple) or not all(isinstance(k, str) and k for k in allow):
        raise SettingError(
            f"resume_allow must be a list of dotted setting keys (e.g. [optim.lr]), got {allow!r}"
        )
    if allow and config.get("resume") is None:
        raise SettingError(
            f"resume_allow={list(allow)} is given without resume=: it only applies to a resume"
        )
    return list(allow)


def check_resume(
    resume: str | Path, current: Mapping[str, Any], allow: Sequence[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Stop with a one-line :class:`~spar.provenance.ProvenanceError` listing every key where
    the fingerprint recorded in ``resume``'s training state differs from ``current``, outside
    the keys (or prefixes) in ``allow``; returns the allowed differences ``key -> (old, new)``.

    Raises:
        ProvenanceError: a difference not allowed, an ``allow`` entry that names no recorded
            key, or a state written before fingerprints were recorded.
    """
    state_path, recorded = read_recorded_provenance(resume)
    if recorded is None:
        raise ProvenanceError(
            f"cannot resume: {state_path} records no fingerprint of its settings, data and "
            "weights (written by an older spar), so the resumed run could not be shown to "
            "continue it; start a new run"
        )
    return check_fingerprint(
        recorded,
        current,
        f"cannot resume: {state_path}",
        allow=list(allow),
        hint="resume_allow=[key,...] continues with the new values, recorded in the "
        "checkpoints; or start a new run",
    )
