"""Measure student, teacher and training speed: `python scripts/bench.py backbone=siglip2`.

Prints the tables and writes bench_results.json and bench_strides.png in the run directory.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.bench import format_table, plot_strides, run_benchmark
from spar.distributed import register_run_id_resolver
from spar.io import atomic_write_json
from spar.models import create_backbone
from spar.utils import resolve_device

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    precisions = config["precisions"] or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    results = run_benchmark(
        create_backbone(**config["backbone"]),
        device,
        sizes=config["sizes"],
        strides=config["strides"],
        precisions=precisions,
        batch_sizes=config["batch_sizes"],
        train_batch_sizes=config["train_batch_sizes"],
        window_batch=config["window_batch"],
        warmup=config["warmup"],
        repeats=config["repeats"],
        compile_student=config["compile"],
    )
    results["config"] = config
    atomic_write_json(out_dir / "bench_results.json", results)
    plot_strides(results, out_dir / "bench_strides.png")
    print(format_table(results))
    print(f"results in {out_dir}/bench_results.json and bench_strides.png")


if __name__ == "__main__":
    main()
