"""Dense features of image files written to disk, one safetensors file per image."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .imaging import load_image, prepare_images
from .io import atomic_path
from .utils import module_device

FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def feature_path(image: Path, root: Path, out_dir: Path) -> Path:
    """``out_dir/<image path relative to root, suffix replaced by .safetensors>``."""
    relative = image.relative_to(root) if image != root else Path(image.name)
    return out_dir / relative.with_suffix(".safetensors")


@torch.no_grad()
def extract_features(
    dense: nn.Module,
    paths: Sequence[Path],
    root: Path,
    out_dir: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    bounds: Sequence[int] | None = (2048, 672),
    dtype: str = "float16",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write ``dense(image)`` of every image as ``features`` ((C, h, w), ``dtype``).

    Each file also records, as metadata, the image path, its original size, the size it was
    resized to (the feature map covers that image, padded to a multiple of the patch size) and
    ``metadata`` (e.g. backbone and mode). Files are written atomically and existing ones are
    kept unless ``overwrite``, so an interrupted run resumes. Unreadable images are skipped with
    a warning.

    Returns counts: ``written``, ``kept`` (already there), ``skipped`` and ``skipped_files``.
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    device = module_device(dense)
    counts = {"written": 0, "kept": 0, "skipped": 0, "skipped_files": []}
    for path in tqdm(list(paths), desc="features", unit="img", disable=not show_progress):
        target = feature_path(Path(path), Path(root), Path(out_dir))
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
