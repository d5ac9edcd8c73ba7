"""Measure student, teacher and training speed: `python scripts/speed.py backbone=siglip2`.

Prints the tables and writes speed_results.json and speed_strides.png in the run directory.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import reject_renamed_overrides
from spar.distributed import register_run_id_resolver
from spar.io import atomic_write_json
from spar.models import create_backbone
from spar.speed import format_table, measure_speed, plot_strides
from spar.utils import resolve_device

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="speed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    precisions = config["precisions"] or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    results = measure_speed(
        create_backbone(**config["backbone"]),
        device,
        sizes=config["sizes"],
        stride_sweep=config["stride_sweep"],
        teacher=config["teacher"],
        precisions=precisions,
        batch_sizes=config["batch_sizes"],
        train_batch_sizes=config["train_batch_sizes"],
        warmup=config["warmup"],
        repeats=config["repeats"],
        compile_student=config["compile"],
    )
    results["config"] = config
    atomic_write_json(out_dir / "speed_results.json", results)
    plot_strides(results, out_dir / "speed_strides.png")
    print(format_table(results))
    print(f"results in {out_dir}/speed_results.json and speed_strides.png")


if __name__ == "__main__":
    reject_renamed_overrides(sys.argv[1:], "speed")
    main()
