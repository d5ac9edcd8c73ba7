"""``spar-eval``: score open-vocabulary segmentation on a benchmark.

``spar-eval dataset=ade20k ...`` (also ``python -m spar.eval`` and ``scripts/eval.py``). Runs under
torchrun as well (each rank a shard, confusion matrices summed).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from spar.config import reject_renamed_overrides, report_user_errors
from spar.distributed import distributed_job, is_main_process, register_run_id_resolver
from spar.evaluation import format_results_table, run_evaluation
from spar.models.compiling import describe_compile_report
from spar.utils import configure_matmul_precision

register_run_id_resolver()


@hydra.main(config_path="pkg://spar.configs", config_name="eval", version_base="1.3")
@report_user_errors
def evaluate(cfg: DictConfig) -> None:
    """Evaluate as ``cfg`` (``spar/configs/eval.yaml``) says; print the table (rank 0)."""
    configure_matmul_precision(cfg.tf32)
    out_dir = HydraConfig.get().runtime.output_dir
    with distributed_job():
        results = run_evaluation(cfg, out_dir)
    if is_main_process():
        print(format_results_table(results))
        if results["compile"] is not None:
            print(describe_compile_report(results["compile"]))
        resumed = results["resumed_images"]
        print(
            f"{results['dataset']} ({results['features']}, weights "
            f"{results['fingerprint']['weights'][:8]}"
            + (f", {resumed} images resumed from per_image.jsonl" if resumed else "")
            + f"): results in {out_dir}/eval_results.json"
        )


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "eval")
    evaluate()


if __name__ == "__main__":
    main()
