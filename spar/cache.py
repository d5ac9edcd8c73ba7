"""``spar-cache``: fill the teacher cache for a training config.

``spar-cache backbone=... train_images=...`` (also ``python -m spar.cache`` and
``scripts/cache_teacher.py``). Interrupted runs resume (finished entries are kept); under torchrun
each rank fills a shard.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from spar.config import reject_renamed_overrides, report_user_errors
from spar.distill import fill_cache, fill_heldout_cache, prepare
from spar.distill.run_log import require_writable_folder
from spar.distributed import distributed_job, register_run_id_resolver
from spar.io import atomic_write_json
from spar.utils import configure_matmul_precision

register_run_id_resolver()


@hydra.main(config_path="pkg://spar.configs", config_name="cache_teacher", version_base="1.3")
@report_user_errors
def cache_teacher(cfg: DictConfig) -> None:
    """Fill the cache ``cfg`` (``spar/configs/cache_teacher.yaml``) names; write the counts to
    ``cache_summary.json`` in the run folder and print them (rank 0)."""
    configure_matmul_precision(cfg.tf32)
    out_dir = HydraConfig.get().runtime.output_dir
    require_writable_folder(out_dir, "the run folder")  # cache_summary.json goes there
    with distributed_job():
        setup = prepare(cfg)
        stats = fill_cache(setup)
        stats["heldout_unreadable"] = fill_heldout_cache(setup)
    if setup.context.is_main:
        stats["cache_dir"] = str(setup.targets.cache.root)
        atomic_write_json(f"{out_dir}/cache_summary.json", stats)
        print(
            f"teacher cache {setup.targets.cache.root}: {stats['computed']} computed, "
            f"{stats['reused']} reused, {stats['skipped']} unreadable image view(s)"
        )


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "cache_teacher")
    cache_teacher()


if __name__ == "__main__":
    main()
