"""A disk cache of teacher feature maps: one safetensors file per (teacher, image, view).

Every entry is named by the SHA-256 of a JSON *key* describing everything its content depends
on: the teacher (a digest of its weights, the dtype its windows run in, window, stride, patch
size), the image file (path
relative to the data root, byte size, modification time) and the augmentation plan. A different
backbone, precision, stride, window or augmentation therefore never finds a stale entry.

Every read is verified: the key is stored again inside the file, and a checksum
(:func:`entry_checksum`: BLAKE2b of the key, the description, the dtype, the shape and every
data byte) is stored in its header. A missing, truncated, bit-flipped (data or header), mis-keyed,
mis-shaped or non-finite entry is never used: it is reported with a warning naming the file and
the caller recomputes and overwrites it.

Files are written to a temporary name and renamed into place (``spar.io.atomic_path``), so an
interrupted caching run leaves only complete entries behind and simply resumes; temporary files
of killed writers are removed when a cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path, remove_orphan_temporaries

# 2: entries carry a checksum (format 1 entries have different keys and are never read).
# 3: the teacher identity names the dtype its windows run in (format 2 entries have other keys,
#    so they are never found and are recomputed once).
CACHE_FORMAT = 3
FEATURES = "features"
MISSING = "missing"


def weights_digest(module: nn.Module) -> str:
    """Hex digest of every tensor (name, dtype, shape, bytes) in ``module.state_dict()``."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_checksum(key: str, description: str, tensor: torch.Tensor) -> str:
    """Hex BLAKE2b of an entry's key, description (JSON text), dtype, shape and data bytes:
    the one checksum written with and verified against every cache entry."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{key}|{description}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def window_dtype(teacher: nn.Module) -> str:
    """The dtype a teacher's windows run in, e.g. ``"torch.bfloat16"``.

    A teacher's ``dtype`` where it has one (its windows then run a copy of the weights in that
    dtype, or the backbone converted in place); otherwise the dtype(s) of the floating
    parameters of the module that runs the windows (``window_model``, else ``backbone``), and
    ``"input"`` for a parameter-free backbone (it computes in the images' dtype).
    """
    dtype = getattr(teacher, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return str(dtype)
    model = getattr(teacher, "window_model", teacher.backbone)
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    return ",".join(dtypes) or "input"


def teacher_identity(teacher: nn.Module, name: str | None = None) -> dict[str, Any]:
    """What a teacher's output depends on: weights digest, window dtype (:func:`window_dtype`),
    window, stride, patch size, dim.

    Args:
        teacher: a ``SlidingWindowTeacher`` (anything with ``backbone``, ``window``, ``stride``,
            ``patch_size`` and ``embed_dim``).
        name: a human-readable backbone name, stored for information only.
    """
    return {
        "format": CACHE_FORMAT,
        "backbone": name or type(teacher.backbone).__name__,
        "weights": weights_digest(teacher.backbone),
        "window_dtype": window_dtype(teacher),
        "window": list(teacher.window),
        "stride": list(teacher.stride),
        "patch_size": teacher.patch_size,
        "embed_dim": teacher.embed_dim,
        # A non-default dense head (clip/maskclip dense_head=sclip|clearclip|naclip) changes the
        # maps from the same weights; the default adds no key, so existing entries stay valid.
        **_dense_head_key(teacher.backbone),
    }


def _dense_head_key(backbone: nn.Module) -> dict[str, str]:
    head = getattr(backbone, "dense_head", None)
    return {"dense_head": head} if head not in (None, "maskclip") else {}


def image_identity(path: str | Path, root: str | Path) -> dict[str, Any]:
    """Path relative to ``root``, byte size and modification time of an image file."""
    path = Path(path)
    stat = path.stat()
    try:
        relative = path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        relative = path.resolve().as_posix()
    return {"path": relative, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def entry_key(teacher: dict[str, Any], image: dict[str, Any], view: dict[str, Any]) -> str:
    """SHA-256 hex name of the entry for ``teacher`` (identity), ``image`` and ``view`` (plan)."""
    text = json.dumps({"teacher": teacher, "image": image, "view": view}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class TeacherFeatureCache:
    """Teacher maps on disk under ``root``: ``<root>/<key[:2]>/<key>.safetensors``.

    Each file holds one (C, h, w) float16 tensor named ``features`` and metadata with the key,
    its JSON description and the entry's checksum. Opening a cache removes the temporary files
    that killed writers left under ``root`` (``spar.io.remove_orphan_temporaries``; files of
    live writers, e.g. another job sharing the cache, are kept).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_orphan_temporaries(self.root, time.time())

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str, shape: tuple[int, int, int], *, warn: bool = False) -> bool:
        """True when an entry of ``shape`` with a sound header exists (key, tensor name, shape,
        checksum present); the data bytes are not read (:meth:`load` verifies them). With
        ``warn``, a present but bad entry is reported like :meth:`load` does."""
        problem = self._read(key, shape, data=False)[1]
        if warn:
            self._report(key, problem)
        return problem is None

    def _read(
        self, key: str, shape: tuple[int, int, int], *, data: bool = True
    ) -> tuple[torch.Tensor | None, str | None]:
        """(the entry's tensor, None) when it is sound, otherwise (None, why not); without
        ``data`` only the header is checked (and no tensor is returned)."""
        path = self.path(key)
        if not path.is_file():
            return None, MISSING
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("key") != key:
                    return None, f"key {metadata.get('key')!r} differs from its file name"
                if list(file.keys()) != [FEATURES]:
                    return None, f"tensors {list(file.keys())}, expected [{FEATURES!r}]"
                stored = tuple(file.get_slice(FEATURES).get_shape())
                if stored != tuple(shape):
                    return None, f"shape {stored}, expected {tuple(shape)}"
                if "checksum" not in metadata:
                    return None, "without a checksum"
                if not data:
                    return None, None
                # A private copy: the tensor is read from a memory map of the file, and what is
                # verified must be what is used, whatever happens to the file afterwards.
                features = file.get_tensor(FEATURES).clone()
        except Exception as error:  # noqa: BLE001 - any unreadable file is a bad entry
            return None, f"unreadable ({error})"
        expected = entry_checksum(key, metadata.get("description", ""), features)
        if metadata["checksum"] != expected:
            return None, "damaged (its checksum does not match its content)"
        if not torch.isfinite(features).all():
            return None, "non-finite values"
        return features, None

    def _report(self, key: str, problem: str | None) -> None:
        if problem is not None and problem != MISSING:
            warnings.warn(
                f"teacher cache entry {self.path(key)} is {problem}; recomputing it", stacklevel=3
            )

    def load(self, key: str, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """The (C, h, w) float16 map of ``key``, or ``None`` when missing or not trustworthy.

        A present but bad entry (wrong key or shape, unreadable, truncated, checksum mismatch,
        non-finite values) is reported with a warning naming the file; the caller recomputes
        and overwrites it.
        """
        features, problem = self._read(key, shape)
        self._report(key, problem)
        return features

    def save(self, key: str, features: torch.Tensor, description: dict[str, Any]) -> Path:
        """Store a (C, h, w) map as float16 atomically; ``description`` is the key's JSON."""
        if features.ndim != 3:
            raise ValueError(f"teacher features must be (C, h, w), got {tuple(features.shape)}")
        path = self.path(key)
        tensor = features.detach().to("cpu", torch.float16).contiguous()
        text = json.dumps(description, sort_keys=True)
        metadata = {"key": key, "description": text, "checksum": entry_checksum(key, text, tensor)}
        with atomic_path(path) as temporary:
            save_file({FEATURES: tensor}, str(temporary), metadata=metadata)
        return path
