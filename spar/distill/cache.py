"""A disk cache of teacher feature maps: one safetensors file per (teacher, image, view).

Every entry is named by the SHA-256 of a JSON *key* describing everything its content depends
on: the teacher (a digest of its weights, window, stride, patch size), the image file (path
relative to the data root, byte size, modification time) and the augmentation plan. A different
backbone, stride, window or augmentation therefore never finds a stale entry. The key is stored
again inside the file and checked on read, together with the shape and the values, so a corrupt,
truncated or mismatched file is reported and recomputed, never trusted.

Files are written to a temporary name and renamed into place, so an interrupted caching run leaves
only complete entries behind and simply resumes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path

CACHE_FORMAT = 1
FEATURES = "features"


def weights_digest(module: nn.Module) -> str:
    """Hex digest of every tensor (name, dtype, shape, bytes) in ``module.state_dict()``."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_identity(teacher: nn.Module, name: str | None = None) -> dict[str, Any]:
    """What a teacher's output depends on: weights digest, window, stride, patch size, dim.

    Args:
        teacher: a ``SlidingWindowTeacher`` (anything with ``backbone``, ``window``, ``stride``,
            ``patch_size`` and ``embed_dim``).
        name: a human-readable backbone name, stored for information only.
    """
    return {
        "format": CACHE_FORMAT,
        "backbone": name or type(teacher.backbone).__name__,
        "weights": weights_digest(teacher.backbone),
        "window": list(teacher.window),
        "stride": list(teacher.stride),
        "patch_size": teacher.patch_size,
        "embed_dim": teacher.embed_dim,
    }


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

    Each file holds one (C, h, w) float16 tensor named ``features`` and metadata with the key
    and its JSON description.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str, shape: tuple[int, int, int]) -> bool:
        """True when a well-formed entry of ``shape`` exists (header check only, no data read)."""
        return self._check_header(key, shape) is None

    def _check_header(self, key: str, shape: tuple[int, int, int]) -> str | None:
        """None if the entry's header fits, otherwise the reason it does not."""
        path = self.path(key)
        if not path.is_file():
            return "missing"
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("key") != key:
                    return f"key {metadata.get('key')!r} differs from its file name"
                if list(file.keys()) != [FEATURES]:
                    return f"tensors {list(file.keys())}, expected [{FEATURES!r}]"
                stored = tuple(file.get_slice(FEATURES).get_shape())
        except Exception as error:  # noqa: BLE001 - any unreadable file is a bad entry
            return f"unreadable ({error})"
        if stored != tuple(shape):
            return f"shape {stored}, expected {tuple(shape)}"
        return None

    def load(self, key: str, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """The (C, h, w) float16 map of ``key``, or ``None`` when missing or not trustworthy.

        A present but bad entry (wrong key or shape, unreadable, non-finite values) is reported
        with a warning naming the file; the caller recomputes and overwrites it.
        """
        problem = self._check_header(key, shape)
        if problem == "missing":
            return None
        features = None
        if problem is None:
            try:
                with safe_open(str(self.path(key)), framework="pt") as file:
                    features = file.get_tensor(FEATURES)
            except Exception as error:  # noqa: BLE001
                problem = f"unreadable ({error})"
        if features is not None and not torch.isfinite(features).all():
            problem, features = "non-finite values", None
        if problem is not None:
            warnings.warn(
                f"teacher cache entry {self.path(key)} is {problem}; recomputing it", stacklevel=2
            )
            return None
        return features

    def save(self, key: str, features: torch.Tensor, description: dict[str, Any]) -> Path:
        """Store a (C, h, w) map as float16 atomically; ``description`` is the key's JSON."""
        if features.ndim != 3:
            raise ValueError(f"teacher features must be (C, h, w), got {tuple(features.shape)}")
        path = self.path(key)
        tensor = features.detach().to("cpu", torch.float16).contiguous()
        metadata = {"key": key, "description": json.dumps(description, sort_keys=True)}
        with atomic_path(path) as temporary:
            save_file({FEATURES: tensor}, str(temporary), metadata=metadata)
        return path
