"""Open-vocabulary segmentation scored on a benchmark: the paper's evaluation protocol.

Each image is resized keeping its aspect ratio to fit ``bounds`` (long, short), its dense
features (student single pass, or the sliding-window teacher) are compared with the class-name
embeddings, the scaled logits are upsampled bilinearly to the label's original size, and the
argmax (after optional background thresholds) is counted in a confusion matrix over the split.
With a refine stage that has bounds of its own (LPOSS / LPOSS+), that stage gets the original
image and resizes it once itself, as the published LPOSS pipeline does.
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
from torch.utils.data import Subset

from .config import (
    RENAMED_SETTINGS,
    SettingError,
    check_renamed,
    require,
    require_bool,
    require_int,
)
from .data.benchmarks import BENCHMARKS, IGNORE_INDEX, SegmentationBenchmark, check_split
from .distributed import DistributedContext, init_distributed
from .imaging import DEFAULT_MAX_IMAGE_PIXELS, prepare_images, set_max_image_pixels
from .io import append_json_line, atomic_save_image, atomic_write_json, complete_lines
from .metrics import MeanIoU
from .models import compile_report, create_backbone, dense_features
from .models.compiling import check_compile_target
from .models.teacher import check_feature_source
from .refine import build_stages, check_stage_settings
from .segmentation import OpenVocabSegmenter, display_names, load_class_names
from .timing import synchronize
from .utils import PRECISIONS, autocast_for


def prediction_to_png(prediction: torch.Tensor) -> Image.Image:
    """(H, W) class indices in [0, 256) -> a single-channel 8-bit PNG image."""
    if prediction.numel() and int(prediction.max()) > 255:
        raise ValueError("prediction PNGs hold at most 256 classes")
    return Image.fromarray(prediction.to(torch.uint8).cpu().numpy(), mode="L")


def read_prediction_png(path: str | Path) -> np.ndarray:
    """(H, W) int64 class indices from a PNG written by :func:`prediction_to_png`."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int64)


class PerImageResults:
    """Per-image scores written as the evaluation goes: one JSON line per image in
    ``path`` (``per_image.jsonl``; ``per_image.rank<r>.jsonl`` under torchrun), so a crash keeps
    every image scored so far, and a re-run into the same folder with the same settings
    resumes from them.

    Each line holds ``name``, and either ``skipped`` (why) or ``pixels`` (counted), ``correct``
    and ``confusion``: the image's non-zero confusion-matrix cells as ``[label, predicted,
    count]``. The first line of each file is ``{"signature": ...}``; files written with another
    signature (other settings) are refused, never mixed.

    Args:
        folder: where the files go.
        signature: what the scores depend on (the resolved config without its speed settings).
        context: rank (each rank appends to its own file; all files are read to resume).
    """

    def __init__(self, folder: str | Path, signature: Any, context: DistributedContext) -> None:
        self.folder = Path(folder)
        self.signature = json.loads(json.dumps(signature, sort_keys=True, default=str))
        name = (
            f"per_image.rank{context.rank}.jsonl" if context.is_distributed else "per_image.jsonl"
        )
        self.path = self.folder / name
        self.done: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob("per_image*.jsonl")):
            self.done.update(self._read(path))

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        records = {}
        for number, line in enumerate(complete_lines(path)):  # drops a line cut short by a crash
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {number + 1} is not JSON") from None
            if number == 0:
                if record.get("signature") != self.signature:
                    raise ValueError(
                        f"{path} holds per-image scores of other settings; evaluate into a new "
                        "folder (the default run folder is unique) or remove it"
                    )
                continue
            records[record["name"]] = record
        return records

    def write(self, record: dict[str, Any]) -> None:
        """Append one image's record (a crash keeps every complete line)."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            append_json_line(self.path, {"signature": self.signature})
        append_json_line(self.path, record)

    @staticmethod
    def scored(name: str, confusion: torch.Tensor) -> dict[str, Any]:
        """The record of an image scored with the (K, K) ``confusion`` of its pixels alone."""
        cells = confusion.nonzero().tolist()
        return {
            "name": name,
            "pixels": int(confusion.sum()),
            "correct": int(confusion.diagonal().sum()),
            "confusion": [[t, p, int(confusion[t, p])] for t, p in cells],
        }

    @staticmethod
    def add_to(metric: MeanIoU, record: dict[str, Any]) -> None:
        """Add a stored image's confusion cells to ``metric``."""
        for target, predicted, count in record["confusion"]:
            metric.confusion[target, predicted] += count


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
    per_image: PerImageResults | None = None,
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
        per_image: where each image's scores are written as it is scored; the images it
            already holds are not evaluated again, their stored scores count instead.

    Returns:
        ``miou``, ``aacc``, ``macc`` (percent), ``per_class_iou`` (name -> percent or None when
        the class is absent from labels and predictions), ``num_images``, ``skipped_images``,
        ``skipped_files``, ``seconds``, ``images_per_second`` (of the images scored in this
        call), ``resumed_images`` (scores read from ``per_image``).
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
    done = per_image.done if per_image is not None else {}
    skipped, evaluated, resumed = [], 0, 0
    if context.is_main:  # stored scores count once, on rank 0
        for record in done.values():
            if "skipped" in record:
                skipped.append(record["image_path"])
            else:
                PerImageResults.add_to(metric, record)
                resumed += 1
    input_bounds = _segmenter_input_bounds(segmenter, bounds)
    remaining = [i for i, sample in enumerate(dataset.samples) if sample.name not in done]
    loader = context.shard_loader(
        Subset(dataset, remaining), num_workers, pin_memory=device.type == "cuda"
    )
    start = time.perf_counter()
    progress = context.progress(loader, show_progress, desc=dataset.spec.name, unit="img")
    for item in progress:
        if item["skipped"] is not None:
            warnings.warn(f"skipping {item['image_path']}: {item['skipped']}", stacklevel=2)
            skipped.append(item["image_path"])
            if per_image is not None:
                per_image.write(
                    {
                        "name": item["name"],
                        "image_path": item["image_path"],
                        "skipped": item["skipped"],
                    }
                )
            continue
        label = item["label"]
        inputs = prepare_images(item["image"], mean, std, input_bounds, device).inputs
        with torch.no_grad(), autocast():
            prediction = segmenter.predict(inputs, output_size=tuple(label.shape))[0].cpu()
        image_metric = MeanIoU(dataset.num_classes, ignore_index=IGNORE_INDEX)
        image_metric.update(prediction, label)
        metric.merge(image_metric)
        evaluated += 1
        if predictions_dir is not None:
            atomic_save_image(
                Path(predictions_dir) / f"{item['name']}.png", prediction_to_png(prediction)
            )
        if per_image is not None:
            per_image.write(PerImageResults.scored(item["name"], image_metric.confusion))
    synchronize(device)
    seconds = time.perf_counter() - start
    if context.is_distributed:
        confusion = metric.confusion.to(context.device if device.type == "cuda" else "cpu")
        dist.all_reduce(confusion)
        metric.confusion.copy_(confusion.cpu())
        evaluated, resumed = (int(n) for n in context.all_reduce_sum([evaluated, resumed]))
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
        "num_images": evaluated + resumed,
        "resumed_images": resumed,
        "skipped_images": len(skipped),
        "skipped_files": sorted(skipped),
        "seconds": seconds,
        "images_per_second": evaluated / max(seconds, 1e-9),
    }


def _segmenter_input_bounds(
    segmenter: OpenVocabSegmenter, bounds: Sequence[int]
) -> Sequence[int] | None:
    """The bounds the evaluation resizes an image to before the segmenter sees it.

    A refine stage with bounds of its own (LPOSS / LPOSS+, ``refine.short_side``) gets the
    original image and resizes it once itself, as the published LPOSS pipeline resizes the
    original to fit (2048, 448) (vladan-stojnic/LPOSS ``segmentation/configs/_base_/datasets``):
    ``None`` (no resize here). Otherwise ``bounds``.
    """
    refiner_bounds = getattr(getattr(segmenter, "refiner", None), "bounds", None)
    return None if refiner_bounds is not None else bounds


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
    check_stage_settings(config.get("refine"), config.get("upsample"))
    check_eval_settings(config)
    set_max_image_pixels(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
    context = init_distributed(config.get("device", "auto"))
    data_cfg = config["dataset"]
    dataset = SegmentationBenchmark(data_cfg["name"], data_cfg["root"], data_cfg.get("split"))
    check_split(dataset)  # the whole split's layout, before any model is built
    per_image = PerImageResults(Path(out_dir), _signature(config), context)
    classes = dataset_classes(data_cfg)
    backbone = create_backbone(
        **config["backbone"],
        checkpoint=config.get("checkpoint"),
        compile=check_compile_target(config.get("compile", False), config["features"]),
    )
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
        **build_stages(config, context.device),
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
        class_names=display_names(classes),
        predictions_dir=out_dir / "predictions" if config.get("save_predictions") else None,
        context=context,
        num_workers=config.get("num_workers", 0),
        show_progress=config.get("show_progress", True),
        per_image=per_image,
    )
    results = {"dataset": dataset.spec.name, "features": config["features"], **results}
    results["compile"] = compile_report(backbone)
    results["config"] = config
    if context.is_main:
        atomic_write_json(out_dir / "eval_results.json", results)
    return results


def check_eval_settings(config: dict[str, Any]) -> None:
    """Check the values ``run_evaluation`` reads besides the model and the stages, before any
    long work; errors (:class:`~spar.config.SettingError`) name the key and the value.

    Among them the class names (:func:`dataset_classes`): ``dataset.name`` is a known
    benchmark, and its class-name file (``dataset.class_names``, default the benchmark's own)
    reads and holds one class per class of the benchmark, so that a wrong file fails before the
    dataset is scanned, the backbone built and the names encoded."""
    dataset_classes(config["dataset"])
    if config.get("features") == "teacher":
        from .models.teacher import check_teacher_settings

        check_teacher_settings(config.get("teacher"), config["backbone"]["name"])
    bounds = config["dataset"].get("bounds")
    require(
        isinstance(bounds, list | tuple)
        and len(bounds) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds),
        "dataset.bounds",
        bounds,
        "a [long, short] pair of positive integers",
    )
    precision = config.get("precision", "auto")
    require(precision in PRECISIONS, "precision", precision, f"one of {PRECISIONS}")
    require_int("num_workers", config.get("num_workers", 0), 0)
    require_int("max_image_pixels", config.get("max_image_pixels"), 1, optional=True)
    require_bool("save_predictions", config.get("save_predictions", False))


def dataset_classes(data_cfg: dict[str, Any]) -> list[list[str]]:
    """The synonym lists of the classes of ``data_cfg`` (the ``dataset`` config): its
    ``class_names`` file, or the benchmark's own file when that is null.

    Raises :class:`~spar.config.SettingError` for an unknown ``name``, or a file whose number of
    classes differs from the benchmark's, naming the file and both counts;
    :class:`~spar.segmentation.ClassNameError` for a file that cannot be used (empty, not UTF-8,
    a name given twice).
    """
    name = data_cfg.get("name")
    require(name in BENCHMARKS, "dataset.name", name, f"one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    given = data_cfg.get("class_names")
    require(
        given is None or isinstance(given, str | Path),
        "dataset.class_names",
        given,
        "the path of a class-name file (one class per line) or null",
    )
    path = given or spec.class_file
    classes = load_class_names(path)
    if len(classes) != spec.num_classes:
        raise SettingError(
            f"dataset.class_names: {path} holds {len(classes)} classes, but {name} has "
            f"{spec.num_classes} (one class per line, synonyms comma-separated on it)"
        )
    return classes


def _signature(config: dict[str, Any]) -> dict[str, Any]:
    """What per-image scores depend on: the config without the settings of speed and display."""
    return {k: v for k, v in config.items() if k not in ("num_workers", "show_progress")}


def _row_label(results: dict[str, Any]) -> str:
    """Backbone, feature source and checkpoint, then the refinement stages that are on (so an
    LPOSS or AnyUp run gets its own row)."""
    config = results.get("config", {})
    backbone = config.get("backbone", {}).get("name", "?")
    if results.get("features") == "teacher":
        label = f"{backbone} teacher (stride {config.get('teacher', {}).get('stride')})"
    elif config.get("checkpoint"):
        label = f"{backbone} SPAR ({Path(config['checkpoint']).name})"
    else:
        label = f"{backbone} single pass"
    refine = (config.get("refine") or {}).get("name", "none")
    upsample = (config.get("upsample") or {}).get("name", "bilinear")
    stages = [name for name, off in ((refine, "none"), (upsample, "bilinear")) if name != off]
    return " + ".join([label, *stages])


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
