"""``spar-train``: distil the sliding-window teacher into the single pass.

``spar-train backbone=siglip2 ...`` (also ``python -m spar.train`` and ``scripts/train.py``); with
no overrides the tiny backbone trains on the bundled sample images (the quick start). Runs under
torchrun as well: ``torchrun --nproc_per_node 4 -m spar.train backbone=siglip2 ...``.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from spar.config import reject_renamed_overrides, report_user_errors
from spar.distill import run_distillation
from spar.distributed import distributed_job, is_main_process, register_run_id_resolver
from spar.models.compiling import describe_compile_report
from spar.utils import configure_matmul_precision

register_run_id_resolver()


@hydra.main(config_path="pkg://spar.configs", config_name="train", version_base="1.3")
@report_user_errors
def train(cfg: DictConfig) -> None:
    """Train as ``cfg`` (``spar/configs/train.yaml``) says; print the summary (rank 0)."""
    configure_matmul_precision(cfg.tf32)
    out_dir = HydraConfig.get().runtime.output_dir
    with distributed_job():
        summary = run_distillation(cfg, out_dir)
    if not is_main_process():
        return
    print(
        f"steps {summary['steps']}, images {summary['images_seen']} "
        f"({summary['images_per_second']:.2f}/s), skipped {summary['skipped_images']}"
    )
    for name, row in summary["heldout_sizes"].items():
        print(
            f"held-out {name}: mse {row['mse_before']:.4g} -> {row['mse_after']:.4g}, "
            f"cos {row['cos_before']:.4f} -> {row['cos_after']:.4f} ({row['images']} images)"
        )
    print(f"checkpoint {summary['checkpoint']}; summary in {out_dir}/train_summary.json")
    if summary["compile"] is not None:
        print(describe_compile_report(summary["compile"]))


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "train")
    train()


if __name__ == "__main__":
    main()
