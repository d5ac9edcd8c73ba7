"""Teacher versus student on a few images: agreement, speed, pictures, segmentation.

This is what ``make demo`` runs on the bundled sample images with the tiny backbone; with a real
backbone it shows how far the single pass is from the sliding-window teacher before distillation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import load_image, resize_to_fit
from .io import atomic_save_image, atomic_write_json
from .models import SlidingWindowTeacher
from .segmentation import OpenVocabSegmenter, parse_classes
from .viz import overlay, pca_rgb, side_by_side, to_pil

SAMPLE_IMAGES = Path(__file__).parent / "assets" / "samples"


def _timed(function, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = function(images)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return output, time.perf_counter() - start


def compare_teacher_student(
    backbone: torch.nn.Module,
    image_paths: Sequence[str | Path],
    classes: Sequence[str | Sequence[str]],
    out_dir: str | Path,
    *,
    stride: int = 24,
    window: int | None = None,
    bounds: tuple[int, int] = (448, 336),
    teacher_batch_size: int = 16,
) -> dict:
    """Run student and teacher on each image; write pictures and ``demo_summary.json``.

    For every image (resized to fit ``bounds`` keeping its aspect ratio) this writes
    ``<stem>_features.png`` (PCA of teacher and student features in one basis, side by side)
    and ``<stem>_segmentation.png`` (the student's open-vocabulary segmentation with a legend).

    Returns:
        The summary written to ``out_dir/demo_summary.json``: per-image teacher-student MSE and
        mean cosine similarity, times, window counts, and their means.
    """
    out_dir = Path(out_dir)
    teacher = SlidingWindowTeacher(
        backbone, window=window, stride=stride, batch_size=teacher_batch_size
    )
    segmenter = OpenVocabSegmenter.from_backbone(backbone, classes)
    names = [synonyms[0] for synonyms in parse_classes(classes)]
    device = next(backbone.parameters()).device
    rows = []
    for path in tqdm(list(image_paths), desc="teacher vs student", unit="image"):
        image = resize_to_fit(load_image(path), bounds)
        inputs = backbone.normalize(image).to(device)
        student, student_seconds = _timed(backbone, inputs)
        stitched, teacher_seconds = _timed(teacher, inputs)
        student = student.float()
        with torch.no_grad():
            mask = segmenter.predict(inputs, output_size=tuple(image.shape[-2:]))[0]
        stem = Path(path).stem
        pictures = pca_rgb([stitched[0], student[0]], size=tuple(image.shape[-2:]))
        atomic_save_image(
            out_dir / f"{stem}_features.png",
            side_by_side(
                [to_pil(image), to_pil(pictures[0]), to_pil(pictures[1])],
                ["image", f"teacher (stride {stride})", "student (single pass)"],
            ),
        )
        atomic_save_image(out_dir / f"{stem}_segmentation.png", overlay(image, mask.cpu(), names))
        rows.append(
            {
                "image": str(path),
                "size": list(image.shape[-2:]),
                "windows": teacher.num_windows(*image.shape[-2:]),
                "mse": F.mse_loss(student, stitched).item(),
                "cosine": F.cosine_similarity(student, stitched, dim=1).mean().item(),
                "student_seconds": student_seconds,
                "teacher_seconds": teacher_seconds,
            }
        )
    summary = {
        "stride": stride,
        "window": list(teacher.window),
        "images": rows,
        "mean_mse": sum(r["mse"] for r in rows) / len(rows),
        "mean_cosine": sum(r["cosine"] for r in rows) / len(rows),
        "teacher_over_student_time": sum(r["teacher_seconds"] for r in rows)
        / max(sum(r["student_seconds"] for r in rows), 1e-12),
    }
    atomic_write_json(out_dir / "demo_summary.json", summary)
    return summary
