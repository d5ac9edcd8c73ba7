"""Dense features of images to safetensors: `python scripts/extract_features.py images=dir/`."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.data import list_images
from spar.distributed import register_run_id_resolver
from spar.features import extract_features
from spar.io import atomic_write_json
from spar.models import SlidingWindowTeacher, create_backbone
from spar.utils import resolve_device

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="extract_features", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir = Path(cfg.output) if cfg.output else run_dir / "features"
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint)
    backbone = backbone.to(resolve_device(cfg.device))
    if cfg.mode not in ("single", "slide"):
        raise ValueError(f"mode must be 'single' or 'slide', got {cfg.mode!r}")
    dense = backbone
    if cfg.mode == "slide":
        dense = SlidingWindowTeacher(backbone, **OmegaConf.to_container(cfg.slide))
    images = Path(cfg.images)
    counts = extract_features(
        dense,
        list_images(images),
        images if images.is_dir() else images.parent,
        out_dir,
        mean=backbone.mean,
        std=backbone.std,
        bounds=None if cfg.bounds is None else tuple(cfg.bounds),
        dtype=cfg.dtype,
        metadata={"backbone": backbone.identity, "checkpoint": cfg.checkpoint, "mode": cfg.mode},
        overwrite=cfg.overwrite,
    )
    atomic_write_json(run_dir / "features_summary.json", {**counts, "output": str(out_dir)})
    print(
        f"{counts['written']} written, {counts['kept']} kept, {counts['skipped']} skipped "
        f"-> {out_dir}"
    )


if __name__ == "__main__":
    main()
