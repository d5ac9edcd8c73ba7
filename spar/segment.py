"""``spar-segment``: segment one image, or every image under a folder, with class names.

``spar-segment image=x.jpg classes="[sky,road]"`` (also ``python -m spar.segment`` and
``scripts/segment.py``). Writes ``<image>_segmentation.png`` (colour overlay with a legend) and
``<image>_features.png`` (PCA of the dense features as RGB); with ``show_teacher=true`` the
sliding-window teacher is shown beside the student in both.

``spar-segment image=photos/ classes=...`` segments every image under the folder (recursively)
with :func:`spar.segment_images.segment_path`: a class-index PNG, an overlay and a JSON of class
shares per image, in ``output`` (default ``<run dir>/segmentation``); rerun with the same
``output`` to resume.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import (
    SettingError,
    reject_renamed_overrides,
    report_user_errors,
    require_bool,
    require_int,
)
from spar.data.images import set_max_image_pixels
from spar.distributed import register_run_id_resolver
from spar.io import atomic_save_image, atomic_write_json
from spar.models import build_teacher, compile_report, create_backbone
from spar.models.compiling import describe_compile_report
from spar.models.teacher_config import check_teacher_settings
from spar.refine import build_stages, check_stage_settings
from spar.segment_images import check_output_folder, images_under, segment_path
from spar.utils import resolve_device
from spar.viz import feature_picture, segmentation_picture, side_by_side, source_title

register_run_id_resolver()


@hydra.main(config_path="pkg://spar.configs", config_name="segment", version_base="1.3")
@report_user_errors
def segment(cfg: DictConfig) -> None:
    """Segment ``cfg.image`` as ``cfg`` (``spar/configs/segment.yaml``) says; write the two
    pictures to the run folder (an image) or every image's outputs to ``cfg.output`` (a
    folder)."""
    if Path(cfg.image).is_dir():
        segment_folder(cfg)
        return
    if cfg.show_teacher:
        check_teacher_settings(OmegaConf.to_container(cfg.teacher), cfg.backbone.name)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    stages = {group: OmegaConf.to_container(cfg[group]) for group in ("refine", "upsample")}
    check_stage_settings(stages.get("refine"), stages.get("upsample"))  # before any long work
    set_max_image_pixels(cfg.max_image_pixels)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint, compile=cfg.compile)
    backbone = backbone.to(resolve_device(cfg.device))
    classes = list(OmegaConf.to_container(cfg.classes))
    bounds = None if cfg.bounds is None else tuple(cfg.bounds)
    options = dict(
        bounds=bounds,
        templates=cfg.templates,
        logit_scale=cfg.logit_scale,
        prob_threshold=cfg.prob_threshold,
        area_threshold=cfg.area_threshold,
        **build_stages(stages, backbone.device),
    )
    picture, _ = segmentation_picture(backbone, cfg.image, classes, **options)
    teacher = build_teacher(backbone, cfg.teacher) if cfg.show_teacher else None
    if teacher is not None:
        teacher_picture, _ = segmentation_picture(
            backbone, cfg.image, classes, dense=teacher, **options
        )
        picture = side_by_side(
            [picture, teacher_picture], ["student (single pass)", source_title(teacher)]
        )
    stem = Path(cfg.image).stem
    atomic_save_image(out_dir / f"{stem}_segmentation.png", picture)
    features = feature_picture(backbone, cfg.image, dense=teacher, bounds=bounds)
    atomic_save_image(out_dir / f"{stem}_features.png", features)
    print(f"wrote {out_dir / f'{stem}_segmentation.png'} and {out_dir / f'{stem}_features.png'}")
    if cfg.compile:
        print(describe_compile_report(compile_report(backbone)))


#: Settings that change how fast the stages run, not what they find: not in the fingerprint.
_SPEED_SETTINGS = ("refine.batch_size", "refine.knn_block", "upsample.chunk_size")


def segment_folder(cfg: DictConfig) -> None:
    """Segment every image under the folder ``cfg.image`` into ``cfg.output`` (default
    ``<run dir>/segmentation``); print the counts and write them to ``segment_summary.json``
    in the run folder. The images, the output folder and the settings are checked before the
    model is built."""
    if cfg.show_teacher:
        raise SettingError(
            f"show_teacher=true draws the teacher beside the student for one image; image="
            f"{cfg.image} is a folder, segmented by the student alone: set show_teacher=false"
        )
    require_int("batch_size", cfg.batch_size, 1)
    require_bool("show_progress", cfg.show_progress)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stages = {group: OmegaConf.to_container(cfg[group]) for group in ("refine", "upsample")}
    check_stage_settings(stages.get("refine"), stages.get("upsample"))
    out_dir = Path(cfg.output) if cfg.output else run_dir / "segmentation"
    images, _ = images_under(cfg.image, out_dir)  # no image: one line, before the model is built
    check_output_folder(out_dir)
    set_max_image_pixels(cfg.max_image_pixels)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint, compile=cfg.compile)
    backbone = backbone.to(resolve_device(cfg.device))
    recorded = {
        f"{group}.{key}": value
        for group, settings in stages.items()
        for key, value in (settings or {}).items()
        if f"{group}.{key}" not in _SPEED_SETTINGS
    }
    summary = segment_path(
        backbone,
        cfg.image,
        list(OmegaConf.to_container(cfg.classes)),
        out_dir,
        bounds=None if cfg.bounds is None else tuple(cfg.bounds),
        templates=cfg.templates,
        logit_scale=cfg.logit_scale,
        prob_threshold=cfg.prob_threshold,
        area_threshold=cfg.area_threshold,
        batch_size=cfg.batch_size,
        show_progress=cfg.show_progress,
        settings=recorded,
        **build_stages(stages, backbone.device),
    )
    atomic_write_json(run_dir / "segment_summary.json", {"images": len(images), **vars(summary)})
    print(summary.describe())
    if cfg.compile:
        print(describe_compile_report(compile_report(backbone)))


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "segment")
    segment()


if __name__ == "__main__":
    main()
