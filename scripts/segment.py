"""Segment one image with class names: `python scripts/segment.py image=x.jpg classes="[sky,road]"`.

Writes `<image>_segmentation.png` (colour overlay with a legend) and `<image>_features.png` (PCA of
the dense features as RGB); with `teacher=true` the sliding-window teacher is shown beside the
student in both.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.distributed import register_run_id_resolver
from spar.io import atomic_save_image
from spar.models import SlidingWindowTeacher, create_backbone
from spar.utils import resolve_device
from spar.viz import feature_picture, segmentation_picture, side_by_side

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="segment", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint)
    backbone = backbone.to(resolve_device(cfg.device))
    classes = list(OmegaConf.to_container(cfg.classes))
    bounds = None if cfg.bounds is None else tuple(cfg.bounds)
    options = dict(
        bounds=bounds,
        logit_scale=cfg.logit_scale,
        prob_threshold=cfg.prob_threshold,
        area_threshold=cfg.area_threshold,
    )
    picture, _ = segmentation_picture(backbone, cfg.image, classes, **options)
    teacher = None
    if cfg.teacher:
        teacher = SlidingWindowTeacher(backbone, **OmegaConf.to_container(cfg.slide))
        teacher_picture, _ = segmentation_picture(
            backbone, cfg.image, classes, dense=teacher, **options
        )
        picture = side_by_side(
            [picture, teacher_picture],
            ["student (single pass)", f"teacher (stride {cfg.slide.stride})"],
        )
    stem = Path(cfg.image).stem
    atomic_save_image(out_dir / f"{stem}_segmentation.png", picture)
    features = feature_picture(backbone, cfg.image, teacher=teacher, bounds=bounds)
    atomic_save_image(out_dir / f"{stem}_features.png", features)
    print(f"wrote {out_dir / f'{stem}_segmentation.png'} and {out_dir / f'{stem}_features.png'}")


if __name__ == "__main__":
    main()
