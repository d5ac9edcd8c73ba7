"""Names of per-image outputs (evaluation records, feature files, prediction PNGs), checked to
be unique before any work: two inputs never share one output."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from .config import SettingError


class OutputCollisionError(SettingError):
    """Two inputs would be written to (or recorded under) the same output name."""


def relative_name(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` in POSIX form, file name and suffix kept
    (``root/a/x.jpg`` -> ``"a/x.jpg"``); ``path`` itself (POSIX) when it is not under ``root``,
    and its file name when it is ``root`` (a single image given as the input)."""
    path, root = Path(path), Path(root)
    if path == root:
        return path.name
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def unique_names(
    inputs: Iterable[str | Path], name_of: Callable[[Path], str], what: str
) -> list[str]:
    """``name_of(input)`` for every input, in order; raises :class:`OutputCollisionError`
    naming both inputs (and the shared name) when two inputs get one name.

    Args:
        inputs: the input files.
        name_of: input -> the name of its output (or record).
        what: the kind of output, for the message (e.g. ``"feature file"``).
    """
    seen: dict[str, Path] = {}
    names = []
    for item in inputs:
        item = Path(item)
        name = name_of(item)
        if name in seen:
            first = seen[name]
            detail = "the same file is listed twice" if first == item else "rename one of them"
            raise OutputCollisionError(
                f"{first} and {item} would both be written as {what} {name!r} ({detail})"
            )
        seen[name] = item
        names.append(name)
    return names
