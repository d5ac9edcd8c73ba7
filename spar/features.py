"""Dense features of image files written to disk, one safetensors file per image, in a folder
whose ``fingerprint.json`` says what they were made from (weights, settings, images)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .config import SettingError
from .imaging import load_image, prepare_images
from .io import atomic_path, atomic_write_json
from .models.teacher import SlidingWindowTeacher
from .output_names import unique_names
from .protocol import PROTOCOL
from .provenance import (
    ProvenanceError,
    check_fingerprint,
    image_list_fingerprint,
    settings_fingerprint,
    weights_digest,
)
from .utils import module_device

FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: The folder's record of what its features were made from.
FINGERPRINT_FILE = "fingerprint.json"

_HINT = "extract into a new output folder, or pass overwrite=true to replace its features"


def feature_path(image: Path, root: Path, out_dir: Path) -> Path:
    """``out_dir/<image path relative to root>.safetensors``, the image's whole file name kept
    (``root/a/x.jpg`` -> ``out_dir/a/x.jpg.safetensors``), so that ``x.jpg`` beside ``x.png``
    get two files. A single image given as ``root`` itself gets ``out_dir/<name>.safetensors``.

    Raises :class:`~spar.config.SettingError` for an image outside ``root``."""
    image, root = Path(image), Path(root)
    if image == root:
        return Path(out_dir) / f"{image.name}.safetensors"
    try:
        relative = image.relative_to(root)
    except ValueError:
        raise SettingError(f"image {image} is not under the images root {root}") from None
    if ".." in relative.parts:
        raise SettingError(f"image {image} is not under the images root {root}")
    return Path(out_dir) / relative.parent / f"{relative.name}.safetensors"


def features_fingerprint(
    dense: nn.Module,
    paths: Sequence[Path],
    root: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    bounds: Sequence[int] | None,
    dtype: str,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a features folder depends on (flat, :mod:`spar.provenance`): ``weights`` (content
    digest of ``dense``: the backbone, or the teacher with its backbone), ``source`` (its class),
    the teacher's ``teacher.window`` / ``teacher.stride`` / ``teacher.dtype``, ``bounds``,
    ``mean``, ``std``, ``dtype``, ``data.images`` (the images' relative paths, sizes and mtimes)
    and the caller's ``settings`` (e.g. ``backbone.name``, ``features``)."""
    fingerprint: dict[str, Any] = {
        "weights": weights_digest(dense),
        "source": type(dense).__name__,
        "bounds": None if bounds is None else list(bounds),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "dtype": dtype,
        "data.images": image_list_fingerprint(paths, root),
    }
    if isinstance(dense, SlidingWindowTeacher):
        window_dtype = "float32" if dense.dtype is None else str(dense.dtype).split(".")[-1]
        fingerprint["teacher.window"] = list(dense.window)
        fingerprint["teacher.stride"] = list(dense.stride)
        fingerprint["teacher.dtype"] = window_dtype
    return {**fingerprint, **settings_fingerprint(settings or {})}


def _feature_files(out_dir: Path) -> list[Path]:
    """The feature files under ``out_dir`` (not the hidden temporary files of a killed write)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.rglob("*.safetensors") if not p.name.startswith("."))


def prepare_folder(
    out_dir: Path, fingerprint: Mapping[str, Any], targets: Sequence[Path], overwrite: bool
) -> None:
    """Check ``out_dir`` against ``fingerprint`` and record it there (``fingerprint.json``,
    atomically) before any feature is written.

    Without ``overwrite``: a folder made from another fingerprint, or holding features but no
    fingerprint (an older spar), is refused (:class:`~spar.provenance.ProvenanceError` listing
    the differences). With ``overwrite``: every feature file in the folder must be one of
    ``targets`` (otherwise it would stay, unlisted, beside the new ones); when the fingerprint
    differs, the old files are removed before the new fingerprint is written, so that a crash
    never leaves old features under the new fingerprint."""
    record = out_dir / FINGERPRINT_FILE
    recorded = None
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ProvenanceError(f"{record} is not a features fingerprint; {_HINT}") from None
    existing = _feature_files(out_dir)
    if not overwrite:
        if recorded is not None:
            check_fingerprint(recorded, fingerprint, str(out_dir), hint=_HINT)
            return
        if existing:
            raise ProvenanceError(
                f"{out_dir} holds feature files ({existing[0]}, ...) but no {FINGERPRINT_FILE} "
                f"of what they were made from (written by an older spar); {_HINT}"
            )
    else:
        wanted = set(targets)
        stray = [path for path in existing if path not in wanted]
        if stray:
            raise ProvenanceError(
                f"{out_dir} holds feature files of images not in this run ({stray[0]}, "
                f"{len(stray)} in all), which overwrite would leave beside the new ones; "
                "extract into a new output folder"
            )
        if recorded != json.loads(json.dumps(dict(fingerprint), default=str)):
            record.unlink(missing_ok=True)
            for path in existing:
                path.unlink()
    atomic_write_json(record, {"fingerprint": dict(fingerprint)})


@torch.no_grad()
def extract_features(
    dense: nn.Module,
    paths: Sequence[Path],
    root: Path,
    out_dir: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    bounds: Sequence[int] | None = PROTOCOL.bounds,
    dtype: str = "float16",
    metadata: dict[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write ``dense(image)`` of every image as ``features`` ((C, h, w), ``dtype``) to
    :func:`feature_path` under ``out_dir``.

    Before any work: two images that would share a file are refused naming both
    (:class:`~spar.output_names.OutputCollisionError`), and the folder is checked against
    :func:`features_fingerprint` and records it (:func:`prepare_folder`), so a resumed run keeps
    only files made from the same weights, settings and images.

    Each file also records, as metadata, the image path, its original size, the size it was
    resized to (the feature map covers that image, padded to a multiple of the patch size) and
    ``metadata`` (e.g. backbone and mode). Files are written atomically and existing ones are
    kept unless ``overwrite``, so an interrupted run resumes. Unreadable images are skipped with
    a warning.

    Args:
        settings: what else the features depend on that ``dense`` does not show (e.g.
            ``{"backbone": {"name": ...}, "features": "student"}``), added to the fingerprint.

    Returns counts: ``written``, ``kept`` (already there), ``skipped`` and ``skipped_files``.
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    paths, root, out_dir = [Path(p) for p in paths], Path(root), Path(out_dir)
    targets = [feature_path(path, root, out_dir) for path in paths]
    unique_names(paths, lambda path: str(feature_path(path, root, out_dir)), "feature file")
    fingerprint = features_fingerprint(
        dense, paths, root, mean=mean, std=std, bounds=bounds, dtype=dtype, settings=settings
    )
    prepare_folder(out_dir, fingerprint, targets, overwrite)
    device = module_device(dense)
    counts = {"written": 0, "kept": 0, "skipped": 0, "skipped_files": []}
    progress = tqdm(paths, desc="features", unit="img", disable=not show_progress)
    for path, target in zip(progress, targets, strict=True):
        if target.is_file() and not overwrite:
            counts["kept"] += 1
            continue
        try:
            pixels = load_image(path)
        except (ValueError, OSError) as error:
            warnings.warn(f"skipping {path}: {error}", stacklevel=2)
            counts["skipped"] += 1
            counts["skipped_files"].append(str(path))
            continue
        inputs = prepare_images(pixels, mean, std, bounds, device).inputs
        features = dense(inputs)[0]
        info = {
            "image": str(path),
            "original_size": list(pixels.shape[-2:]),
            "input_size": list(inputs.shape[-2:]),
            **(metadata or {}),
        }
        tensor = features.to("cpu", FEATURE_DTYPES[dtype]).contiguous()
        with atomic_path(target) as temporary:
            save_file({"features": tensor}, str(temporary), metadata={"info": json.dumps(info)})
        counts["written"] += 1
    return counts
