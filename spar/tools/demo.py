"""Teacher versus student on a few images: agreement, speed, pictures, segmentation.

``make demo`` distils the tiny backbone on the bundled sample images, then runs this with the
distilled student next to the pretrained one; with a real backbone it shows how far the single
pass is from the sliding-window teacher before and after distillation.

As a command: ``python -m spar.tools.demo [images=dir] [checkpoint=path]`` (``scripts/demo.py``;
config ``spar/configs/demo.yaml``) prints a line per image and writes the pictures and
``demo_summary.json`` to the run folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..class_names import display_names
from ..config import renamed_arguments, report_user_errors
from ..data import SAMPLE_IMAGES, list_images, prepare_image
from ..data.images import set_max_image_pixels
from ..io import atomic_save_image, atomic_write_json
from ..models import SlidingWindowTeacher, build_teacher, create_backbone
from ..models.teacher_config import check_teacher_settings
from ..segmentation import OpenVocabSegmenter
from ..timing import timed_call
from ..utils import module_device, resolve_device
from ..viz import overlay, pca_picture, source_title


@renamed_arguments()
def compare_teacher_student(
    backbone: torch.nn.Module,
    image_paths: Sequence[str | Path],
    classes: Sequence[str | Sequence[str]],
    out_dir: str | Path,
    *,
    teacher: SlidingWindowTeacher | None = None,
    bounds: tuple[int, int] = (448, 336),
    distilled: torch.nn.Module | None = None,
) -> dict:
    """Run student and teacher on each image; write pictures and ``demo_summary.json``.

    For every image (resized to fit ``bounds`` keeping its aspect ratio) this writes
    ``<stem>_features.png`` (PCA of teacher and student features in one basis, side by side)
    and ``<stem>_segmentation.png`` (the student's open-vocabulary segmentation with a legend).

    Args:
        backbone: the pretrained backbone: the teacher, and the single-pass baseline.
        teacher: the sliding-window teacher of ``backbone`` (default: ``build_teacher(backbone)``,
            stride 24 at the native window).
        distilled: optionally the distilled student (same family); it is then shown beside the
            pretrained single pass, its agreement with the teacher is reported as
            ``distilled_mse``/``distilled_cosine``, and it draws the segmentation.

    Returns:
        The summary written to ``out_dir/demo_summary.json``: per-image teacher-student MSE and
        mean cosine similarity, times, window counts, and their means.
    """
    out_dir = Path(out_dir)
    teacher = teacher if teacher is not None else build_teacher(backbone)
    segmenter = OpenVocabSegmenter.from_backbone(distilled or backbone, classes)
    names = display_names(classes)
    device = module_device(backbone)
    rows = []
    for path in tqdm(list(image_paths), desc="teacher vs student", unit="image"):
        image, inputs = prepare_image(path, bounds, backbone.mean, backbone.std, device)
        with torch.no_grad():
            student, student_seconds = timed_call(partial(backbone, inputs), device)
            stitched, teacher_seconds = timed_call(partial(teacher, inputs), device)
        maps = [stitched[0], student.float()[0]]
        titles = ["image", source_title(teacher), "single pass (pretrained)"]
        row = {
            "image": str(path),
            "size": list(image.shape[-2:]),
            "windows": teacher.num_windows(*image.shape[-2:]),
            "mse": F.mse_loss(maps[1], maps[0]).item(),
            "cosine": F.cosine_similarity(maps[1], maps[0], dim=0).mean().item(),
            "student_seconds": student_seconds,
            "teacher_seconds": teacher_seconds,
        }
        if distilled is not None:
            with torch.no_grad():
                maps.append(distilled(inputs).float()[0])
            titles.append("SPAR student (distilled)")
            row["distilled_mse"] = F.mse_loss(maps[2], maps[0]).item()
            row["distilled_cosine"] = F.cosine_similarity(maps[2], maps[0], dim=0).mean().item()
        with torch.no_grad():
            mask = segmenter.predict(inputs, output_size=tuple(image.shape[-2:]))[0]
        stem = Path(path).stem
        atomic_save_image(out_dir / f"{stem}_features.png", pca_picture(image, maps, titles))
        atomic_save_image(out_dir / f"{stem}_segmentation.png", overlay(image, mask.cpu(), names))
        rows.append(row)
    summary = {
        "stride": teacher.stride[0] if len(set(teacher.stride)) == 1 else list(teacher.stride),
        "distilled": distilled is not None,
        "window": list(teacher.window),
        "images": rows,
        "mean_mse": sum(r["mse"] for r in rows) / len(rows),
        "mean_cosine": sum(r["cosine"] for r in rows) / len(rows),
        **(
            {
                "mean_distilled_mse": sum(r["distilled_mse"] for r in rows) / len(rows),
                "mean_distilled_cosine": sum(r["distilled_cosine"] for r in rows) / len(rows),
            }
            if distilled is not None
            else {}
        ),
        "teacher_over_student_time": sum(r["teacher_seconds"] for r in rows)
        / max(sum(r["student_seconds"] for r in rows), 1e-12),
    }
    atomic_write_json(out_dir / "demo_summary.json", summary)
    return summary


def print_summary(summary: dict, out_dir: str | Path) -> None:
    """A line per image of :func:`compare_teacher_student`'s ``summary`` and the means."""
    distilled = summary["distilled"]
    header = f"{'image':<24}{'size':>10}{'windows':>9}{'cos pretrained':>16}"
    header += f"{'cos distilled':>15}" if distilled else ""
    print(header + f"{'student s':>11}{'teacher s':>11}")
    for row in summary["images"]:
        line = f"{row['image'].split('/')[-1]:<24}{'x'.join(map(str, row['size'])):>10}"
        line += f"{row['windows']:>9}{row['cosine']:>16.3f}"
        line += f"{row['distilled_cosine']:>15.3f}" if distilled else ""
        print(line + f"{row['student_seconds']:>11.3f}{row['teacher_seconds']:>11.3f}")
    distilled_part = f", distilled {summary['mean_distilled_cosine']:.3f}" if distilled else ""
    print(
        f"mean cosine to the teacher: pretrained {summary['mean_cosine']:.3f}{distilled_part}; "
        f"teacher/student time {summary['teacher_over_student_time']:.1f}x; "
        f"pictures and summary in {out_dir}"
    )


@hydra.main(config_path="pkg://spar.configs", config_name="demo", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """The command line (Hydra overrides): compare as ``cfg`` says, print the summary."""
    check_teacher_settings(OmegaConf.to_container(cfg.teacher), cfg.backbone.name)
    set_max_image_pixels(cfg.max_image_pixels)
    device = resolve_device(cfg.device)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(**backbone_cfg).to(device)
    distilled = None
    if cfg.checkpoint:
        distilled = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint).to(device)
    out_dir = HydraConfig.get().runtime.output_dir
    summary = compare_teacher_student(
        backbone,
        list_images(cfg.images or SAMPLE_IMAGES),
        list(cfg.classes),
        out_dir,
        teacher=build_teacher(backbone, cfg.teacher),
        bounds=tuple(cfg.bounds),
        distilled=distilled,
    )
    print_summary(summary, out_dir)


if __name__ == "__main__":
    main()
