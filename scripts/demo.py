"""Teacher vs student on images: `python scripts/demo.py [images=dir] [checkpoint=path]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import report_user_errors
from spar.data import SAMPLE_IMAGES, list_images
from spar.data.images import set_max_image_pixels
from spar.demo import compare_teacher_student
from spar.models import build_teacher, create_backbone
from spar.models.teacher import check_teacher_settings
from spar.utils import resolve_device


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
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
    header = f"{'image':<24}{'size':>10}{'windows':>9}{'cos pretrained':>16}"
    header += f"{'cos distilled':>15}" if distilled is not None else ""
    print(header + f"{'student s':>11}{'teacher s':>11}")
    for row in summary["images"]:
        line = f"{row['image'].split('/')[-1]:<24}{'x'.join(map(str, row['size'])):>10}"
        line += f"{row['windows']:>9}{row['cosine']:>16.3f}"
        line += f"{row['distilled_cosine']:>15.3f}" if distilled is not None else ""
        print(line + f"{row['student_seconds']:>11.3f}{row['teacher_seconds']:>11.3f}")
    distilled_part = (
        f", distilled {summary['mean_distilled_cosine']:.3f}" if distilled is not None else ""
    )
    print(
        f"mean cosine to the teacher: pretrained {summary['mean_cosine']:.3f}{distilled_part}; "
        f"teacher/student time {summary['teacher_over_student_time']:.1f}x; "
        f"pictures and summary in {out_dir}"
    )


if __name__ == "__main__":
    main()
