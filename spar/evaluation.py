"""Open-vocabulary segmentation scored on a benchmark: the paper's evaluation protocol.

Each image is resized keeping its aspect ratio to fit ``bounds`` (long, short), its dense
features (student single pass, or the sliding-window teacher) are compared with the class-name
embeddings, the scaled logits are upsampled bilinearly to the label's original size, and the
argmax (after optional background thresholds) is counted in a confusion matrix over the split.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .config import RENAMED_SETTINGS, check_renamed
from .data.benchmarks import IGNORE_INDEX, SegmentationBenchmark
from .data.images import prepare_image
from .distributed import DistributedContext, init_distributed
from .io import atomic_save_image, atomic_write_json
from .metrics import MeanIoU
from .models import create_backbone, dense_features
from .models.teacher import check_feature_source
from .segmentation import OpenVocabSegmenter, load_class_names
from .utils import autocast_for


def prediction_to_png(prediction: torch.Tensor) -> Image.Image:
    """(H, W) class indices in [0, 256) -> a single-channel 8-bit PNG image."""
    if prediction.numel() and int(prediction.max()) > 255:
        raise ValueError("prediction PNGs hold at most 256 classes")
    return Image.fromarray(prediction.to(torch.uint8).cpu().numpy(), mode="L")


def read_prediction_png(path: str | Path) -> np.ndarray:
    """(H, W) int64 class indices from a PNG written by :func:`prediction_to_png`."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int64)


def evaluate_benchmark(
    segmenter: OpenVocabSegmenter,
    dataset: SegmentationBenchmark,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    bounds: Sequence[int] = (2048, 672),
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    class_names: Sequence[str] | None = None,
    predictions_dir: str | Path | None = None,
    context: DistributedContext | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score ``segmenter`` on ``dataset``; returns the results (percentages).

    Args:
        segmenter: features + text classifier, with the benchmark's logit scale/thresholds.
        dataset: the benchmark split.
        mean, std: input normalisation of the backbone.
        bounds: (long, short) resize bound.
        class_names: one display name per class for ``per_class_iou``.
        predictions_dir: when given, every prediction is written there as ``<name>.png``
            (class indices, 0 = first class of the class-name file).
        context: under torchrun, each rank takes every N-th image and the confusion matrices
            are summed.

    Returns:
        ``miou``, ``aacc``, ``macc`` (percent), ``per_class_iou`` (name -> percent or None when
        the class is absent from labels and predictions), ``num_images``, ``skipped_images``,
        ``skipped_files``, ``seconds``, ``images_per_second``.
    """
    context = context or DistributedContext()
    device = torch.device(device)
    if segmenter.num_classes != dataset.num_classes:
        raise ValueError(
            f"{segmenter.num_classes} class names for {dataset.spec.name}, which has "
            f"{dataset.num_classes} classes"
        )
    names = list(class_names or [str(i) for i in range(dataset.num_classes)])
    metric = MeanIoU(dataset.num_classes, ignore_index=IGNORE_INDEX)
    loader = context.shard_loader(dataset, num_workers, pin_memory=device.type == "cuda")
    skipped, evaluated = [], 0
    start = time.perf_counter()
    progress = context.progress(loader, show_progress, desc=dataset.spec.name, unit="img")
    for item in progress:
        if item["skipped"] is not None:
            warnings.warn(f"skipping {item['image_path']}: {item['skipped']}", stacklevel=2)
            skipped.append(item["image_path"])
            continue
        label = item["label"]
        _, inputs = prepare_image(item["image"], bounds, mean, std, device)
        with torch.no_grad(), autocast():
            prediction = segmenter.predict(inputs, output_size=tuple(label.shape))[0].cpu()
        metric.update(prediction, label)
        evaluated += 1
        if predictions_dir is not None:
            atomic_save_image(
                Path(predictions_dir) / f"{item['name']}.png", prediction_to_png(prediction)
            )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if context.is_distributed:
        confusion = metric.confusion.to(context.device if device.type == "cuda" else "cpu")
        dist.all_reduce(confusion)
        metric.confusion.copy_(confusion.cpu())
        evaluated = int(context.all_reduce_sum([evaluated])[0])
        skipped = context.union(skipped)
    scores = metric.compute()
    return {
        "miou": 100 * scores.miou,
        "aacc": 100 * scores.aacc,
        "macc": 100 * scores.macc,
        "per_class_iou": {
            name: None if np.isnan(value) else 100 * float(value)
            for name, value in zip(names, scores.per_class_iou.tolist(), strict=True)
        },
        "num_images": evaluated,
        "skipped_images": len(skipped),
        "skipped_files": sorted(skipped),
        "seconds": seconds,
        "images_per_second": evaluated / max(seconds, 1e-9),
    }


def format_results_table(results: dict[str, Any]) -> str:
    """Per-class IoU table and the summary line, as printed by ``scripts/eval.py``."""
    width = max([len(name) for name in results["per_class_iou"]] + [5])
    lines = [f"{'class':<{width}}  {'IoU':>6}", "-" * (width + 8)]
    for name, value in results["per_class_iou"].items():
        lines.append(f"{name:<{width}}  {'n/a' if value is None else f'{value:.2f}':>6}")
    lines.append("-" * (width + 8))
    lines.append(
        f"mIoU {results['miou']:.2f}  aAcc {results['aacc']:.2f}  mAcc {results['macc']:.2f}  "
        f"images {results['num_images']} (skipped {results['skipped_images']})  "
        f"{results['images_per_second']:.2f} img/s"
    )
    return "\n".join(lines)


def run_evaluation(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate as ``configs/eval.yaml`` describes; rank 0 writes ``eval_results.json``.

    The config holds ``backbone`` (``create_backbone`` arguments), ``checkpoint``, ``features``
    (``student``: one pass of the backbone | ``teacher``: the sliding-window teacher),
    ``teacher`` (window, stride, batch_size), ``templates`` (a template-set name), ``dataset``
    (name, root, split, class_names, bounds, logit_scale, logit_bias, prob_threshold,
    area_threshold), ``save_predictions``, ``device``, ``precision``, ``num_workers``.
    """
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    check_renamed(config, RENAMED_SETTINGS["eval"], "run_evaluation")
    check_feature_source(config["features"])
    context = init_distributed(config.get("device", "auto"))
    data_cfg = config["dataset"]
    dataset = SegmentationBenchmark(data_cfg["name"], data_cfg["root"], data_cfg.get("split"))
    classes = load_class_names(data_cfg.get("class_names") or dataset.spec.class_file)
    backbone = create_backbone(**config["backbone"], checkpoint=config.get("checkpoint"))
    backbone = backbone.to(context.device)
    precision = config.get("precision", "auto")
    segmenter = OpenVocabSegmenter.from_backbone(
        backbone,
        classes,
        dense=dense_features(backbone, config["features"], config.get("teacher"), precision),
        templates=config.get("templates", "imagenet80"),
        logit_scale=data_cfg["logit_scale"],
        logit_bias=data_cfg.get("logit_bias", 0.0),
        prob_threshold=data_cfg.get("prob_threshold"),
        area_threshold=data_cfg.get("area_threshold"),
    )
    out_dir = Path(out_dir)
    results = evaluate_benchmark(
        segmenter,
        dataset,
        backbone.mean,
        backbone.std,
        bounds=tuple(data_cfg["bounds"]),
        device=context.device,
        autocast=autocast_for(precision, context.device),
        class_names=[synonyms[0] for synonyms in classes],
        predictions_dir=out_dir / "predictions" if config.get("save_predictions") else None,
        context=context,
        num_workers=config.get("num_workers", 0),
        show_progress=config.get("show_progress", True),
    )
    results = {"dataset": dataset.spec.name, "features": config["features"], **results}
    results["config"] = config
    if context.is_main:
        atomic_write_json(out_dir / "eval_results.json", results)
    return results


def _row_label(results: dict[str, Any]) -> str:
    config = results.get("config", {})
    backbone = config.get("backbone", {}).get("name", "?")
    if results.get("features") == "teacher":
        return f"{backbone} teacher (stride {config.get('teacher', {}).get('stride')})"
    checkpoint = config.get("checkpoint")
    return f"{backbone} SPAR ({Path(checkpoint).name})" if checkpoint else f"{backbone} single pass"


def collect_results(root: str | Path) -> str:
    """A markdown table of every ``eval_results.json`` under ``root``: one row per backbone,
    mode and checkpoint, one column per dataset, plus their mean (mIoU, percent)."""
    rows: dict[str, dict[str, float]] = {}
    for path in sorted(Path(root).rglob("eval_results.json")):
        results = json.loads(path.read_text())
        rows.setdefault(_row_label(results), {})[results["dataset"]] = results["miou"]
    if not rows:
        raise FileNotFoundError(f"no eval_results.json under {root}")
    datasets = sorted({name for row in rows.values() for name in row})
    lines = [
        "| setting | " + " | ".join(datasets) + " | mean |",
        "|---|" + "---|" * (len(datasets) + 1),
    ]
    for label, row in rows.items():
        cells = [f"{row[d]:.1f}" if d in row else "" for d in datasets]
        mean = f"{sum(row.values()) / len(row):.1f}" if len(row) == len(datasets) else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)
