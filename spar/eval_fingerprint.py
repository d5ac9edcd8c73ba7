"""What an evaluation's scores depend on, as a flat fingerprint (:mod:`spar.provenance`):
``per_image.jsonl`` resumes only under an equal one, ``eval_results.json`` records it and
``collect_results`` makes one row per distinct one.

Keys: the settings that change scores (dotted config keys, without the speed and display
settings and without paths whose content is fingerprinted instead), ``autocast`` (the resolved
precision), ``teacher.dtype`` with ``features=teacher``, ``data.images`` / ``data.labels`` (the
split's files: relative paths, sizes, mtimes), ``data.class_names`` (content digest of the
class-name file), ``weights`` (content digest of the backbone after any checkpoint is loaded)
and ``stage_weights.refine`` / ``stage_weights.upsample`` for stages with weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .provenance import file_digest, image_list_fingerprint, settings_fingerprint, weights_digest

#: Settings that do not change any score: speed, display, where things are (the content of a
#: checkpoint, pretrained file, dataset or class-name file is fingerprinted instead).
NOT_SCORED = (
    "num_workers",
    "show_progress",
    "device",
    "compile",
    "save_predictions",
    "checkpoint",
    "backbone.pretrained",
    "backbone.trainable_blocks",  # which parameters would train: no score changes
    "dataset.root",
    "dataset.class_names",
    "teacher.batch_size",
    "teacher.compile",
    "teacher.cache",
    "teacher.cache_dir",
)

#: Keys known only once the models are built (checked then; the rest before).
KEYS_KNOWN_LATER = ("weights", "stage_weights")

#: Keys that belong to one dataset of a results table (a row spans datasets).
DATASET_KEYS = ("dataset", "data")


def evaluation_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The scored settings of a resolved eval config (dotted keys); the ``teacher`` group only
    with ``features=teacher``."""
    ignore = list(NOT_SCORED)
    if config.get("features") != "teacher":
        ignore.append("teacher")
    return settings_fingerprint(config, ignore=ignore)


def data_fingerprint(dataset: Any, class_file: str) -> dict[str, Any]:
    """``data.images``, ``data.labels`` and ``data.class_names`` of a
    :class:`~spar.data.benchmarks.SegmentationBenchmark` split and its class-name file."""
    return {
        "data.images": image_list_fingerprint([s.image for s in dataset.samples], dataset.root),
        "data.labels": image_list_fingerprint([s.label for s in dataset.samples], dataset.root),
        "data.class_names": file_digest(class_file),
    }


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; ``None`` (full precision) -> ``"float32"``."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def model_fingerprint(backbone: nn.Module, stages: Mapping[str, Any]) -> dict[str, Any]:
    """``weights`` (the backbone, text tower included, as evaluated) and the weights of each
    stage in ``stages`` (``refiner`` / ``upsampler``) that has any."""
    fingerprint = {"weights": weights_digest(backbone)}
    for name, stage in stages.items():
        if isinstance(stage, nn.Module) and stage.state_dict():
            key = {"refiner": "refine", "upsampler": "upsample"}.get(name, name)
            fingerprint[f"stage_weights.{key}"] = weights_digest(stage)
    return fingerprint


def row_key(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint that a results-table row shares across its datasets."""
    return {
        key: value
        for key, value in fingerprint.items()
        if not any(key == p or key.startswith(p + ".") for p in DATASET_KEYS)
    }
