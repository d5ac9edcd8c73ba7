"""Class lists and class-name files: synonyms, checks, and the names classes are shown under.

A class entry is a name, a comma-separated string of synonyms (``"person, pedestrian"``) or a
sequence of synonyms; :func:`parse_classes` and :func:`load_class_names` turn a list or a file
into one list of names per class, refusing with a one-line :class:`ClassNameError` what could
never be segmented (no class, a class without a name, a name given twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import SettingError

ClassEntry = str | Sequence[str]


class ClassNameError(SettingError):
    """A class list or class-name file cannot be used: empty, unreadable, a class without a
    name, or a name given twice; the message names the file (or ``classes``) and the names."""


#: At most this many repeated names are quoted in an error (a pasted list may repeat hundreds).
_REPEATS_SHOWN = 5


def _class_synonyms(classes: Sequence[ClassEntry]) -> list[list[str]]:
    """Class entries -> one list of stripped, non-empty names per class (see
    :func:`parse_classes`), without the check for repeated names."""
    if isinstance(classes, str):
        raise ClassNameError(f"classes must be a list of class entries, not the string {classes!r}")
    parsed = []
    for index, entry in enumerate(classes):
        parts = entry.split(",") if isinstance(entry, str) else list(entry)
        names = [str(name).strip() for name in parts if str(name).strip()]
        if not names:
            raise ClassNameError(f"class {index} ({entry!r}) has no name")
        parsed.append(names)
    if not parsed:
        raise ClassNameError("the class list is empty: give at least one class name")
    return parsed


def _name_key(name: str) -> str:
    """What two class names are compared by: case and runs of spaces ignored (CLIP's tokenizer
    lowercases and collapses spaces, so ``"Car"`` and ``"car"`` give one embedding)."""
    return " ".join(name.casefold().split())


def _places(places: list[str], shown: int = 3) -> str:
    """``"line 2, line 5"``; past ``shown`` places: ``"class 0, class 9, class 12, ... 40 times"``
    (the count of all)."""
    more = f", ... {len(places)} times" if len(places) > shown else ""
    return ", ".join(places[:shown]) + more


def _reject_repeated_names(synonyms: list[list[str]], where: str, positions: Sequence[str]) -> None:
    """Raise :class:`ClassNameError` when a name appears twice in ``synonyms`` (within a class
    or across classes): the second copy could never win a pixel. ``positions`` names where each
    class came from (``"class 3"``, ``"line 7"``); ``where`` is the list (``classes`` or the
    file)."""
    seen: dict[str, list[str]] = {}
    for position, names in zip(positions, synonyms, strict=True):
        for name in names:
            seen.setdefault(_name_key(name), []).append(position)
    repeated = [(name, places) for name, places in seen.items() if len(places) > 1]
    if not repeated:
        return
    shown = "; ".join(f"{name!r} ({_places(places)})" for name, places in repeated[:_REPEATS_SHOWN])
    more = f"; and {len(repeated) - _REPEATS_SHOWN} more" if len(repeated) > _REPEATS_SHOWN else ""
    raise ClassNameError(
        f"{where}: class names given more than once (compared ignoring case): {shown}{more}; "
        "give each name once (synonyms of one class go on one entry, comma-separated)"
    )


def parse_classes(classes: Sequence[ClassEntry]) -> list[list[str]]:
    """Normalise a class list to synonym lists.

    Each entry is a name, a comma-separated string of synonyms (``"person, pedestrian"``) or a
    sequence of synonyms (``["tv", "monitor"]``). Returns one list of stripped, non-empty names
    per class, in order.

    Raises:
        ClassNameError: (a ``ValueError``) the list is empty, is a single string, a class has no
            name, or a name appears twice (ignoring case), within a class or across classes.
    """
    synonyms = _class_synonyms(classes)
    positions = [f"class {index}" for index in range(len(synonyms))]
    _reject_repeated_names(synonyms, "classes", positions)
    return synonyms


def display_names(classes: Sequence[ClassEntry]) -> list[str]:
    """The name each class is shown under in pictures, legends and results: its first synonym
    (``"person, pedestrian"`` -> ``"person"``); the classes are checked by :func:`parse_classes`."""
    return [synonyms[0] for synonyms in parse_classes(classes)]


def _read_class_file(path: Path) -> str:
    """The text of a class-name file (UTF-8; a byte-order mark is dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ClassNameError(
            f"class-name file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} "
            f"at offset {error.start}); save it as UTF-8, one class per line"
        ) from None


def load_class_names(path: str | Path) -> list[list[str]]:
    """Read a class-name file: one class per line, comma-separated synonyms, blank lines skipped.

    Raises:
        FileNotFoundError: no such file.
        ClassNameError: (a ``ValueError``) the file is not UTF-8, holds no class, a line holds no
            name (e.g. ``" , "``), or a name appears twice (ignoring case); the message names
            the file and, for repeated names, their lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    numbered = [
        (number, line)
        for number, line in enumerate(_read_class_file(path).splitlines(), start=1)
        if line.strip()
    ]
    if not numbered:
        raise ClassNameError(f"class-name file {path} holds no class names (it is empty or blank)")
    try:
        synonyms = _class_synonyms([line for _, line in numbered])
    except ClassNameError as error:
        raise ClassNameError(f"class-name file {path}: {error}") from None
    positions = [f"line {number}" for number, _ in numbered]
    _reject_repeated_names(synonyms, f"class-name file {path}", positions)
    return synonyms
