"""The training log (``metrics.jsonl`` records, handed on to listeners such as TensorBoard) and
the claim on a run folder that makes its one process the only writer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import SettingError, renamed_arguments
from ..io import (
    append_json_line,
    atomic_write_bytes,
    complete_lines,
    probe_writable,
    remove_orphan_temporaries,
)

#: Files that show a run folder already holds a run.
RUN_FILES = ("metrics.jsonl", "train_summary.json", "checkpoints/last.state.pt")
LOCK_FILE = ".run.lock"


class RunFolderError(RuntimeError):
    """A run folder holds another run, or another process writes into it."""


def require_writable_folder(path: str | Path, what: str) -> None:
    """Fail now, in one line naming ``what`` and ``path``, unless files can be written in the
    folder ``path`` (or, while it does not exist yet, created under its nearest existing
    parent). The test is a real one: a probe file is created there and removed (a mode check
    alone misleads, e.g. root ignores modes but not a read-only mount).

    Raises:
        SettingError: the folder (or the parent it would be created in) is not a folder or
            cannot be written.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError(f"{what} {path} cannot be a folder: {existing} is not a folder")
    try:
        probe_writable(existing)
    except OSError as error:
        raise SettingError(
            f"{what} {path} is not writable ({error.strerror or error} in {existing})"
        ) from None


class RunFolder:
    """The claim of one process (rank 0) on a run folder, held until :meth:`release`.

    A folder that already holds a run (:data:`RUN_FILES`) is refused unless ``resume`` points
    into it (the run continues there). While claimed, the folder's lock file is locked
    (``fcntl.flock``; the kernel releases it when the process ends, even by ``kill -9``), so a
    second process writing the same folder fails at once instead of interleaving its records.
    Temporary files that a killed writer left in the folder (``spar.io.atomic_path``) are removed.
    Locks are advisory and local: on network file systems without ``flock`` support only the
    first check holds.

    Raises:
        RunFolderError: naming the folder and what to do.
    """

    def __init__(self, out_dir: str | Path, resume: str | Path | None = None) -> None:
        self.out_dir = Path(out_dir)
        existing = [name for name in RUN_FILES if (self.out_dir / name).exists()]
        if existing and not self._resumes_here(resume):
            raise RunFolderError(
                f"run folder {self.out_dir} already holds a run ({', '.join(existing)}); pass "
                f"resume={self.out_dir} to continue it, or choose another folder "
                "(hydra.run.dir=...; the default is unique per run)"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._handle = self._lock()
        # Only this process writes here now: temporary files of a killed writer are orphans.
        self.removed_temporaries = remove_orphan_temporaries(self.out_dir)

    def _resumes_here(self, resume: str | Path | None) -> bool:
        if resume is None:
            return False
        path = Path(resume).resolve()
        folder = self.out_dir.resolve()
        return path == folder or folder in path.parents

    def _lock(self) -> int | None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: the first check only
            return None
        path = self.out_dir / LOCK_FILE
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(handle)
            raise RunFolderError(
                f"run folder {self.out_dir} is in use by another process (it holds {path}); "
                "two runs never write one folder"
            ) from error
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        return handle

    def release(self) -> None:
        """Unlock the folder (the lock file stays; it is locked again by the next claim)."""
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None


class RunLog:
    """Appends records to ``out_dir/metrics.jsonl`` (one JSON object per line) and hands each
    one to its listeners (e.g. ``spar.distill.hooks.TensorBoardHook``).

    Only the process with ``enabled`` (rank 0) writes; the others ignore every record.
    :attr:`records` counts the lines of the file; a checkpoint stores it and a resumed run
    :meth:`rewind` s to it, so records written after the checkpoint by a killed run are not
    repeated. A line cut short by a kill is dropped when the log is opened.
    """

    @renamed_arguments()
    def __init__(self, out_dir: str | Path, *, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / "metrics.jsonl"
        self.records = len(complete_lines(self.path)) if enabled else 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(record)`` after every record written (once, however often added)."""
        if listener not in self.listeners:
            self.listeners.append(listener)

    def rewind(self, records: int | None) -> None:
        """Keep only the first ``records`` lines (those a checkpoint saw); ``None``: keep all."""
        if not self.enabled or records is None or self.records <= records:
            return
        atomic_write_bytes(self.path, b"".join(complete_lines(self.path)[:records]))
        self.records = records

    def write(self, record: dict[str, Any]) -> None:
        """Log ``record``, a dict with ``event`` and ``step`` and (nested) values."""
        if not self.enabled:
            return
        append_json_line(self.path, record)
        self.records += 1
        for listener in self.listeners:
            listener(record)


def scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a log record as (``event/name``, value) pairs."""
    prefix = prefix or record.get("event", "log")
    pairs = []
    for name, value in record.items():
        if isinstance(value, dict):
            pairs += scalars(value, f"{prefix}/{name}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and name != "step":
            pairs.append((f"{prefix}/{name}", float(value)))
    return pairs
