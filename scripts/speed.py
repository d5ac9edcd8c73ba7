"""Measure student, teacher and training speed: `python scripts/speed.py backbone=siglip2`.

Prints the tables and a training-recipe estimate, and writes speed_results.json and
speed_strides.png in the run directory (with profile=true also the profiler tables
profile_student_<size>.txt and profile_teacher_<size>_s<stride>.txt).
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import reject_renamed_overrides, report_user_errors
from spar.distributed import register_run_id_resolver
from spar.io import atomic_write_bytes, atomic_write_json
from spar.models import create_backbone
from spar.models.teacher import check_teacher_settings
from spar.speed import (
    format_stage_table,
    format_table,
    measure_speed,
    measure_stages,
    plot_strides,
    profile_forwards,
    recipe_estimate,
    resolve_sizes,
    stage_combinations,
)
from spar.utils import configure_matmul_precision, resolve_device

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="speed", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    check_teacher_settings(OmegaConf.to_container(cfg.teacher), cfg.backbone.name)
    configure_matmul_precision(cfg.tf32)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    precisions = config["precisions"] or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    recipe = config["recipe"]
    backbone = create_backbone(**config["backbone"])
    results = measure_speed(
        backbone,
        device,
        sizes=config["sizes"],
        stride_sweep=config["stride_sweep"],
        teacher=config["teacher"],
        precisions=precisions,
        batch_sizes=config["batch_sizes"],
        train_batch_sizes=config["train_batch_sizes"],
        train_size=recipe["size"],
        warmup=config["warmup"],
        repeats=config["repeats"],
        compile=config["compile"],
    )
    results["recipe"] = {
        precision: recipe_estimate(results, recipe["images"], recipe["epochs"], precision)
        for precision in precisions
    }
    results["config"] = config
    stages = stage_combinations(config["refine"], config["upsample"])
    if len(stages) > 1:
        results["stages"] = measure_stages(
            backbone,
            device,
            stages,
            sizes=config["stage_sizes"] or config["sizes"],
            precisions=precisions,
            num_classes=config["stage_classes"],
            warmup=config["warmup"],
            repeats=config["repeats"],
        )
    atomic_write_json(out_dir / "speed_results.json", results)
    plot_strides(results, out_dir / "speed_strides.png")
    print(format_table(results))
    if "stages" in results:
        print(format_stage_table(results["stages"]))
    print(f"results in {out_dir}/speed_results.json and speed_strides.png")
    if config["profile"]:
        sizes = resolve_sizes(config["sizes"], device)
        middle = sizes[len(sizes) // 2]
        for name, text in profile_forwards(
            backbone, device, middle, config["teacher"], precisions
        ).items():
            atomic_write_bytes(out_dir / name, text.encode())
            print(f"profile: {out_dir / name}")


if __name__ == "__main__":
    reject_renamed_overrides(sys.argv[1:], "speed")
    main()
