"""What a result was made from: fingerprints that resumed or reused work is checked against.

Every resumable or reusable output (training checkpoints, evaluation's ``per_image.jsonl``,
``extract_features`` folders, ``save_pretrained`` folders, the page's model cache,
``collect_results`` rows) stores a *fingerprint*: a flat mapping ``dotted key -> value`` of
everything that changes the result. Resuming or reusing it compares the stored fingerprint with
the current one (:func:`check_fingerprint`) and stops, before any work, with one line that lists
each differing key; keys the user names in ``allow`` (``resume_allow=[optim.lr]``) may differ
and are returned, so that the caller can apply and record the change.

The pieces:

- :func:`settings_fingerprint`: the resolved settings that matter (nested mapping -> dotted keys);
- :func:`weights_digest`: a content digest of a module's parameters and buffers (not a path);
- :func:`file_digest`: a content digest of a file (memoised by path, size and mtime);
- :func:`image_list_fingerprint`: a data split, as the relative paths, sizes and mtimes of its
  images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Fingerprint values longer than this are shown abbreviated in error messages.
_SHOWN_CHARS = 60


class ProvenanceError(ValueError):
    """Earlier work was made from other settings, data or weights than the current run's; the
    message lists each differing key with its recorded and current value."""


def _digest_bytes_of(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex BLAKE2b digest of ``name -> tensor`` (names sorted; dtype, shape and bytes each).

    Equal for equal values wherever the tensors live (CPU or GPU); any changed element, dtype,
    shape or name changes it."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name]
        header = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|"
        digest.update(header.encode())
        digest.update(_digest_bytes_of(tensor))
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """Content digest of ``module``'s parameters and persistent buffers (its ``state_dict``)."""
    return tensors_digest(module.state_dict())


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """Hex BLAKE2b digest of the bytes of ``path``, memoised per process by (resolved path,
    size, mtime): a file rewritten in place (``best.safetensors`` during training) gets a new
    digest."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 22), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def image_list_fingerprint(paths: Iterable[str | Path], root: str | Path) -> str:
    """A data split as one string ``"<count> images, <digest>"``; the digest covers each
    image's path relative to ``root`` (in the given order), its size and its mtime, so adding,
    removing, renaming, reordering or rewriting an image changes it."""
    root = Path(root)
    digest = hashlib.blake2b(digest_size=12)
    count = 0
    for path in paths:
        path = Path(path)
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            relative = path.as_posix()
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{relative}\0{size}\0{mtime}\n".encode())
        count += 1
    return f"{count} images, {digest.hexdigest()}"


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (values made JSON-plain:
    tuples become lists, paths and other objects strings)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            nested = flatten(value, dotted + ".")
            flat.update(nested if nested else {dotted: {}})
        else:
            flat[dotted] = json.loads(json.dumps(value, default=str))
    return flat


def settings_fingerprint(
    settings: Mapping[str, Any], ignore: Sequence[str] = (), only: Sequence[str] | None = None
) -> dict[str, Any]:
    """The dotted-key view of ``settings`` that a result depends on.

    Args:
        settings: a resolved (nested) config.
        ignore: dotted keys or key prefixes that do not change the result (e.g. ``num_workers``,
            ``show_progress``); ``"trainer.log_every"`` drops that key, ``"trainer"`` the group.
        only: when given, keep only these keys or prefixes.
    """
    flat = flatten(settings)

    def matches(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return {
        key: value
        for key, value in flat.items()
        if not matches(key, ignore) and (only is None or matches(key, only))
    }


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def fingerprint_differences(
    recorded: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``key -> (recorded, current)`` for every key whose value differs (a key missing on one
    side has the value ``None`` there)."""
    recorded = json.loads(json.dumps(dict(recorded), default=str))
    current = json.loads(json.dumps(dict(current), default=str))
    return {
        key: (recorded.get(key), current.get(key))
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    }


def describe_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``"optim.lr: 0.001 -> 0.01; weights: 3f2a... -> 9b1c..."``."""
    return "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in differences.items())


def check_fingerprint(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    what: str,
    *,
    allow: Sequence[str] = (),
    hint: str = "",
) -> dict[str, tuple[Any, Any]]:
    """Stop with :class:`ProvenanceError` unless ``current`` equals ``recorded`` outside the
    keys (or key prefixes) in ``allow``; return the allowed differences ``key -> (old, new)``.

    Args:
        recorded: the fingerprint stored with the earlier work.
        current: the fingerprint of the run that would resume or reuse it.
        what: the earlier work, named in the message (e.g. ``"runs/a/checkpoints/last"``).
        allow: keys the user allowed to change (``resume_allow``); each must be a key or key
            prefix of one of the two fingerprints, so a typo is an error, not a no-op.
        hint: appended to the message (what to do instead).
    """
    known = set(recorded) | set(current)
    unknown = [a for a in allow if not any(k == a or k.startswith(a + ".") for k in known)]
    if unknown:
        raise ProvenanceError(
            f"{what}: allowed changes name no recorded setting: {', '.join(unknown)} "
            f"(recorded keys include: {', '.join(sorted(known)[:12])}, ...)"
        )
    differences = fingerprint_differences(recorded, current)
    allowed = {
        key: pair
        for key, pair in differences.items()
        if any(key == a or key.startswith(a + ".") for a in allow)
    }
    refused = {key: pair for key, pair in differences.items() if key not in allowed}
    if refused:
        message = f"{what} was made from other settings, data or weights; differing: "
        message += describe_differences(refused)
        raise ProvenanceError(message + (f" ({hint})" if hint else ""))
    return allowed


def same_folder(first: str | Path, second: str | Path) -> bool:
    """``first`` and ``second`` name the same existing folder (symlinks and ``..`` resolved)."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return Path(first).resolve() == Path(second).resolve()
