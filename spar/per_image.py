"""Per-image scores of an evaluation (``per_image.jsonl``), written as it goes and resumed only
when they were made from the same settings, data and weights (the fingerprint on the first
line)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .distributed import DistributedContext
from .io import append_json_line, complete_lines
from .metrics import MeanIoU
from .output_names import relative_name, unique_names
from .provenance import ProvenanceError, check_fingerprint

#: The files of one evaluation folder (``per_image.jsonl``, ``per_image.rank<r>.jsonl``).
PER_IMAGE_FILES = "per_image*.jsonl"

_HINT = "evaluate into a new folder (the default run folder is unique) or remove it"


def image_keys(images: Sequence[str | Path], root: str | Path) -> list[str]:
    """The record key of each image: its path relative to the dataset ``root``
    (``images/validation/a/x.jpg``), so two images with one stem in different folders, or
    ``x.jpg`` beside ``x.png``, are two records. Raises
    :class:`~spar.output_names.OutputCollisionError` naming both images when two map to one
    key (the same file listed twice)."""
    return unique_names(images, lambda path: relative_name(path, root), "per-image record")


def _first_record(path: Path) -> dict[str, Any] | None:
    lines = complete_lines(path)  # drops a line cut short by a crash
    if not lines:
        return None
    try:
        return json.loads(lines[0])
    except json.JSONDecodeError:
        raise ValueError(f"{path}: line 1 is not JSON") from None


def _recorded_fingerprint(path: Path, first: dict[str, Any]) -> dict[str, Any]:
    if "fingerprint" not in first:
        raise ProvenanceError(
            f"{path} holds per-image scores without a fingerprint of their settings, data and "
            f"weights (written by an older spar), so they cannot be checked; {_HINT}"
        )
    return first["fingerprint"]


def check_recorded_settings(
    folder: str | Path, current: Mapping[str, Any], keys_known_later: Sequence[str] = ()
) -> None:
    """Compare the fingerprint of every per-image file in ``folder`` with ``current`` outside
    ``keys_known_later`` (e.g. the weights, known once the model is built), so that other
    settings or data stop a re-run before any model is built.

    Raises :class:`~spar.provenance.ProvenanceError` listing the differing keys."""

    def later(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in keys_known_later)

    for path in sorted(Path(folder).glob(PER_IMAGE_FILES)):
        first = _first_record(path)
        if first is None:
            continue
        recorded = {k: v for k, v in _recorded_fingerprint(path, first).items() if not later(k)}
        check_fingerprint(recorded, current, str(path), hint=_HINT)


class PerImageResults:
    """Per-image scores written as the evaluation goes: one JSON line per image in
    ``per_image.jsonl`` (``per_image.rank<r>.jsonl`` under torchrun), so a crash keeps every
    image scored so far, and a re-run into the same folder resumes from them.

    The first line of each file is ``{"fingerprint": {...}}``: what the scores depend on
    (settings, data, weights; see :func:`spar.evaluation.evaluation_fingerprint`). A file with
    another fingerprint, or none, is refused (:class:`~spar.provenance.ProvenanceError` listing
    the differing keys), never mixed. Every other line holds ``image`` (the key: the image's path
    relative to the dataset root), and either ``skipped`` (why) and ``image_path``, or
    ``pixels`` (counted), ``correct`` and ``confusion``: the image's non-zero confusion-matrix
    cells as ``[label, predicted, count]``.

    Args:
        folder: where the files go.
        fingerprint: the current run's fingerprint (flat ``key -> value``).
        context: rank (each rank appends to its own file; all files are read to resume).
    """

    def __init__(
        self, folder: str | Path, fingerprint: Mapping[str, Any], context: DistributedContext
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), default=str))
        name = (
            f"per_image.rank{context.rank}.jsonl" if context.is_distributed else "per_image.jsonl"
        )
        self.path = self.folder / name
        self.done: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob(PER_IMAGE_FILES)):
            self.done.update(self._read(path))

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        first = _first_record(path)
        if first is None:
            return {}
        check_fingerprint(
            _recorded_fingerprint(path, first), self.fingerprint, str(path), hint=_HINT
        )
        records = {}
        for number, line in enumerate(complete_lines(path)[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {number} is not JSON") from None
            records[record["image"]] = record
        return records

    def write(self, record: dict[str, Any]) -> None:
        """Append one image's record (a crash keeps every complete line)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            append_json_line(self.path, {"fingerprint": self.fingerprint})
        append_json_line(self.path, record)

    @staticmethod
    def scored(key: str, confusion: torch.Tensor) -> dict[str, Any]:
        """The record of image ``key`` scored with the (K, K) ``confusion`` of its pixels
        alone."""
        cells = confusion.nonzero().tolist()
        return {
            "image": key,
            "pixels": int(confusion.sum()),
            "correct": int(confusion.diagonal().sum()),
            "confusion": [[t, p, int(confusion[t, p])] for t, p in cells],
        }

    @staticmethod
    def add_to(metric: MeanIoU, record: dict[str, Any]) -> None:
        """Add a stored image's confusion cells to ``metric``."""
        for target, predicted, count in record["confusion"]:
            metric.confusion[target, predicted] += count
