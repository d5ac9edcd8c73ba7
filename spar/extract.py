"""``spar-extract``: dense features of images to safetensors, one file per image.

``spar-extract images=dir/`` (also ``python -m spar.extract`` and ``scripts/extract_features.py``).
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import reject_renamed_overrides, report_user_errors
from spar.data import list_images
from spar.data.images import set_max_image_pixels
from spar.distributed import register_run_id_resolver
from spar.features import extract_features
from spar.io import atomic_write_json
from spar.models import compile_report, create_backbone, dense_features
from spar.models.compiling import check_compile_target, describe_compile_report
from spar.models.teacher_config import check_feature_source, check_teacher_settings
from spar.utils import resolve_device

register_run_id_resolver()


@hydra.main(config_path="pkg://spar.configs", config_name="extract_features", version_base="1.3")
@report_user_errors
def extract(cfg: DictConfig) -> None:
    """Extract as ``cfg`` (``spar/configs/extract_features.yaml``) says; write the counts to
    ``features_summary.json`` in the run folder and print them."""
    if cfg.features == "teacher":
        check_teacher_settings(OmegaConf.to_container(cfg.teacher), cfg.backbone.name)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir = Path(cfg.output) if cfg.output else run_dir / "features"
    check_feature_source(cfg.features)
    set_max_image_pixels(cfg.max_image_pixels)
    backbone_cfg = OmegaConf.to_container(cfg.backbone)
    backbone = create_backbone(
        **backbone_cfg,
        checkpoint=cfg.checkpoint,
        compile=check_compile_target(cfg.compile, cfg.features),
    )
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
        settings={"backbone": {"name": cfg.backbone.name}, "features": cfg.features},
        overwrite=cfg.overwrite,
    )
    report = compile_report(backbone)
    summary = {**counts, "output": str(out_dir), "compile": report}
    atomic_write_json(run_dir / "features_summary.json", summary)
    print(
        f"{counts['written']} written, {counts['kept']} kept, {counts['skipped']} skipped "
        f"-> {out_dir}"
    )
    if report is not None:
        print(describe_compile_report(report))


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "extract_features")
    extract()


if __name__ == "__main__":
    main()
