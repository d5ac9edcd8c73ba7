"""Writing results so that an interrupted run never leaves a half-written file behind.

Every file the library writes goes through :func:`atomic_path`: it is written under a temporary
name beside its destination, flushed to disk, given the mode the process umask asks for (0644
under umask 022) and renamed into place. A process killed while writing leaves only a temporary
file (never a partial destination), which names its writer (host and process id) so that
:func:`remove_orphan_temporaries` can tell an orphan from a file another live job is writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

TEMPORARY_MARK = ".tmp"
# ".<name>.~<host>~<pid>~<random>.tmp<suffix>": the writer of a temporary file.
_WRITER = re.compile(r"~(?P<host>[^~/]+)~(?P<pid>\d+)~")
#: Temporary files of writers that cannot be checked (another host) are removed only when they
#: are older than this before the running job started: no single file takes that long to write.
FOREIGN_TEMPORARY_AGE_S = 3600.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write; rename it into place on success.

    On success the file is flushed to disk and gets mode ``0666 & ~umask`` (whatever the writer
    did, e.g. safetensors creates 0600 files) before the rename. On any error (or interruption)
    the temporary file is removed and ``path`` is untouched. The temporary name keeps the
    suffix of ``path``, for writers that pick a format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent,
        prefix=f".{path.name}.~{_host()}~{os.getpid()}~",
        suffix=f"{TEMPORARY_MARK}{path.suffix}",
    )
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temporary(path: str | Path) -> bool:
    """True for a temporary file of :func:`atomic_path`."""
    name = Path(path).name
    return name.startswith(".") and TEMPORARY_MARK in name and _WRITER.search(name) is not None


def _writer_alive(name: str) -> bool | None:
    """Whether the process that created the temporary file ``name`` still runs; ``None`` when
    it ran on another host (cannot be checked)."""
    match = _WRITER.search(name)
    if match is None or match["host"] != _host():
        return None
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def remove_orphan_temporaries(folder: str | Path, started: float | None = None) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` under ``folder`` (recursively) that
    were left by a killed writer and are older than the running job; returns them.

    A file is an orphan when it was last written before ``started`` (default: now) and its
    writer is a process of this host that no longer runs, or, for a writer on another host,
    when it was last written more than :data:`FOREIGN_TEMPORARY_AGE_S` before ``started``.
    Files of live writers (e.g. another job sharing a cache) are never touched.
    """
    started = time.time() if started is None else started
    removed = []
    for path in Path(folder).rglob(f".*{TEMPORARY_MARK}*"):
        if not is_temporary(path):
            continue
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:  # its writer just renamed or removed it
            continue
        alive = _writer_alive(path.name)
        if modified >= started or alive:
            continue
        if alive is None and modified > started - FOREIGN_TEMPORARY_AGE_S:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def probe_writable(folder: str | Path) -> None:
    """Create and remove a probe file in the existing ``folder``; raises the ``OSError`` when a
    file cannot be made there. A real write, not a mode check: root ignores modes, but not a
    read-only mount or a path under a file."""
    handle, probe = tempfile.mkstemp(prefix=".spar-write-probe-", dir=folder)
    os.close(handle)
    os.unlink(probe)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as temporary, temporary.open("wb") as file:
        file.write(data)


def complete_lines(path: str | Path) -> list[bytes]:
    """The complete lines of a file written by :func:`append_json_line` (``[]`` when there is no
    file). A trailing line cut short by a killed writer is removed from the file (rewritten
    atomically), so the next append starts on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines = lines[:-1]
        atomic_write_bytes(path, b"".join(lines))
    return lines


def append_json_line(path: str | Path, record: Any) -> None:
    """Append ``record`` as one JSON line to ``path`` (a log that a crash keeps up to its last
    complete line; read it back with :func:`complete_lines`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_image(path: str | Path, image: Image.Image) -> None:
    """Save a PIL image atomically; the format follows the suffix of ``path``."""
    with atomic_path(path) as temporary:
        image.save(temporary)
