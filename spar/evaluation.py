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
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Subset

from .class_names import display_names
from .data.benchmarks import IGNORE_INDEX, SegmentationBenchmark, check_split
from .distributed import DistributedContext, init_distributed
from .eval_fingerprint import (
    KEYS_KNOWN_LATER,
    data_fingerprint,
    dtype_name,
    evaluation_settings,
    model_fingerprint,
)
from .eval_settings import DatasetSettings, EvalSettings, check_eval_settings, dataset_classes
from .imaging import prepare_images, set_max_image_pixels
from .io import atomic_save_image, atomic_write_json
from .metrics import MeanIoU
from .models import compile_report, create_backbone, dense_features
from .output_names import relative_name, unique_names
from .per_image import PerImageResults, check_recorded_settings, image_keys
from .protocol import PROTOCOL
from .refine import build_refiner, build_upsampler
from .results_table import collect_results, format_results_table
from .segmentation import OpenVocabSegmenter
from .timing import synchronize
from .utils import autocast_dtype, autocast_for

__all__ = [
    "DatasetSettings",
    "EvalSettings",
    "PerImageResults",
    "check_eval_settings",
    "collect_results",
    "dataset_classes",
    "evaluate_benchmark",
    "evaluation_fingerprint",
    "format_results_table",
    "prediction_names",
    "prediction_to_png",
    "read_prediction_png",
    "run_evaluation",
]


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
    bounds: Sequence[int] = PROTOCOL.bounds,
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
            (class indices, 0 = first class of the class-name file); two images of one name
            are refused before any work (:func:`prediction_names`).
        context: under torchrun, each rank takes every N-th image and the confusion matrices
            are summed.
        per_image: where each image's scores are written as it is scored, keyed by the
            image's path relative to the dataset root; the images it already holds are not
            evaluated again, their stored scores count instead.

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
    keys = image_keys([sample.image for sample in dataset.samples], dataset.root)
    if predictions_dir is not None:
        prediction_names(dataset)
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
    remaining = [i for i, key in enumerate(keys) if key not in done]
    loader = context.shard_loader(
        Subset(dataset, remaining), num_workers, pin_memory=device.type == "cuda"
    )
    start = time.perf_counter()
    progress = context.progress(loader, show_progress, desc=dataset.spec.name, unit="img")
    for item in progress:
        key = relative_name(item["image_path"], dataset.root)
        if item["skipped"] is not None:
            warnings.warn(f"skipping {item['image_path']}: {item['skipped']}", stacklevel=2)
            skipped.append(item["image_path"])
            if per_image is not None:
                per_image.write(
                    {
                        "image": key,
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
            per_image.write(PerImageResults.scored(key, image_metric.confusion))
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


def prediction_names(dataset: SegmentationBenchmark) -> list[str]:
    """The prediction file of each image, ``<name>.png`` (the benchmark's image name: its id or
    stem); raises :class:`~spar.output_names.OutputCollisionError` naming both images when two
    images of the split share a name (one stem in two sub-folders)."""
    name_of = {sample.image: sample.name for sample in dataset.samples}
    images = [sample.image for sample in dataset.samples]
    return unique_names(images, lambda image: f"{name_of[image]}.png", "prediction")


def evaluation_fingerprint(
    settings: EvalSettings, dataset: SegmentationBenchmark, device: torch.device
) -> dict[str, Any]:
    """What the scores of ``settings`` on ``dataset`` depend on, before any model is built: the
    scored settings (of the recorded config), the resolved precision (and the teacher's dtype),
    the split's files and the class-name file (:mod:`spar.eval_fingerprint`).
    ``run_evaluation`` adds the weights (:func:`~spar.eval_fingerprint.model_fingerprint`) once
    the models are built."""
    autocast = dtype_name(autocast_dtype(settings.precision, torch.device(device)))
    fingerprint = {**evaluation_settings(settings.record), "autocast": autocast}
    if settings.features == "teacher":
        fingerprint["teacher.dtype"] = autocast  # build_teacher copies the weights to it
    return {**fingerprint, **data_fingerprint(dataset, settings.dataset.class_file)}


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


def run_evaluation(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate as ``configs/eval.yaml`` describes; rank 0 writes ``eval_results.json``.

    The config (a Hydra ``DictConfig`` or a plain dict) holds ``backbone`` (``create_backbone``
    arguments), ``checkpoint``, ``features`` (``student``: one pass of the backbone |
    ``teacher``: the sliding-window teacher), ``teacher`` (window, stride, batch_size),
    ``templates`` (a template-set name), ``dataset`` (name, root, split, class_names, bounds,
    logit_scale, logit_bias, prob_threshold, area_threshold), ``save_predictions``, ``device``,
    ``precision``, ``num_workers``. It is checked once, here
    (:meth:`~spar.eval_settings.EvalSettings.from_config`), and passed down as an
    :class:`~spar.eval_settings.EvalSettings`.

    Each image's scores go to ``out_dir/per_image.jsonl`` as it is scored, under the run's
    fingerprint (:func:`evaluation_fingerprint` plus the weights); a re-run into ``out_dir``
    resumes from them only under an equal fingerprint, and otherwise stops with
    :class:`~spar.provenance.ProvenanceError` listing the differing keys: the settings and data
    before any model is built, the weights before any image is scored. ``eval_results.json``
    records the fingerprint.
    """
    return _evaluate(EvalSettings.from_config(cfg, "run_evaluation"), Path(out_dir))


def _evaluate(settings: EvalSettings, out_dir: Path) -> dict[str, Any]:
    """:func:`run_evaluation` of checked ``settings``."""
    set_max_image_pixels(settings.max_image_pixels)
    context = init_distributed(settings.device)
    data = settings.dataset
    dataset = SegmentationBenchmark(data.name, data.root, data.split)
    check_split(dataset)  # the whole split's layout, before any model is built
    image_keys([sample.image for sample in dataset.samples], dataset.root)
    if settings.save_predictions:
        prediction_names(dataset)
    fingerprint = evaluation_fingerprint(settings, dataset, context.device)
    check_recorded_settings(out_dir, fingerprint, KEYS_KNOWN_LATER)  # before any model
    classes = dataset_classes(data)
    backbone = create_backbone(
        **settings.backbone, checkpoint=settings.checkpoint, compile=settings.compile
    )
    backbone = backbone.to(context.device)
    stages = {
        "refiner": build_refiner(settings.refine, context.device),
        "upsampler": build_upsampler(settings.upsample, context.device),
    }
    fingerprint.update(model_fingerprint(backbone, stages))
    per_image = PerImageResults(out_dir, fingerprint, context)  # before the text is encoded
    segmenter = OpenVocabSegmenter.from_backbone(
        backbone,
        classes,
        dense=dense_features(backbone, settings.features, settings.teacher, settings.precision),
        templates=settings.templates,
        logit_scale=data.logit_scale,
        logit_bias=data.logit_bias,
        prob_threshold=data.prob_threshold,
        area_threshold=data.area_threshold,
        **stages,
    )
    results = evaluate_benchmark(
        segmenter,
        dataset,
        backbone.mean,
        backbone.std,
        bounds=data.bounds,
        device=context.device,
        autocast=autocast_for(settings.precision, context.device),
        class_names=display_names(classes),
        predictions_dir=out_dir / "predictions" if settings.save_predictions else None,
        context=context,
        num_workers=settings.num_workers,
        show_progress=settings.show_progress,
        per_image=per_image,
    )
    results = {"dataset": dataset.spec.name, "features": settings.features, **results}
    results["compile"] = compile_report(backbone)
    results["config"] = settings.record
    results["fingerprint"] = per_image.fingerprint
    if context.is_main:
        atomic_write_json(out_dir / "eval_results.json", results)
    return results
