"""Dense features of images to safetensors: `python scripts/extract_features.py images=dir/`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import reject_renamed_overrides
from spar.data import list_images
from spar.distributed import register_run_id_resolver
from spar.features import extract_features
from spar.io import atomic_write_json
from spar.models import create_backbone, dense_features
from spar.models.teacher import check_feature_source
from spar.utils import resolve_device

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="extract_features", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir = Path(cfg.output) if cfg.output else run_dir / "features"
    check_feature_source(cfg.features)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(**backbone_cfg, checkpoint=cfg.checkpoint)
    backbone = backbone.to(resolve_device(cfg.device))
    dense = dense_features(backbone, cfg.features, cfg.teacher)
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
        metadata={
            "backbone": backbone.identity,
            "checkpoint": cfg.checkpoint,
            "features": cfg.features,
        },
        overwrite=cfg.overwrite,
    )
    atomic_write_json(run_dir / "features_summary.json", {**counts, "output": str(out_dir)})
    print(
        f"{counts['written']} written, {counts['kept']} kept, {counts['skipped']} skipped "
        f"-> {out_dir}"
    )


if __name__ == "__main__":
    reject_renamed_overrides(sys.argv[1:], "extract_features")
    main()
