"""Teacher vs student on images: `python scripts/demo.py [backbone=maskclip] [images=dir]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.data import list_images
from spar.demo import SAMPLE_IMAGES, compare_teacher_student
from spar.models import create_backbone
from spar.utils import resolve_device


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    backbone = create_backbone(**OmegaConf.to_container(cfg.backbone)).to(device)
    out_dir = HydraConfig.get().runtime.output_dir
    summary = compare_teacher_student(
        backbone,
        list_images(cfg.images or SAMPLE_IMAGES),
        list(cfg.classes),
        out_dir,
        stride=cfg.teacher.stride,
        window=cfg.teacher.window,
        bounds=tuple(cfg.bounds),
        teacher_batch_size=cfg.teacher.batch_size,
    )
    print(f"{'image':<28}{'size':>12}{'windows':>9}{'cosine':>8}{'student s':>11}{'teacher s':>11}")
    for row in summary["images"]:
        size = "x".join(map(str, row["size"]))
        print(
            f"{row['image'].split('/')[-1]:<28}{size:>12}{row['windows']:>9}{row['cosine']:>8.3f}"
            f"{row['student_seconds']:>11.3f}{row['teacher_seconds']:>11.3f}"
        )
    print(
        f"mean cosine {summary['mean_cosine']:.3f}, teacher/student time "
        f"{summary['teacher_over_student_time']:.1f}x; pictures and summary in {out_dir}"
    )


if __name__ == "__main__":
    main()
