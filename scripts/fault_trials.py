"""Fault trials (kill -9, corruption, bad images): `python scripts/fault_trials.py`.

Prints a table (trial kind, trials, survived, lost) and writes fault_trials.json in the run folder.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import report_user_errors
from spar.distributed import register_run_id_resolver
from spar.fault_trials import run_fault_trials

register_run_id_resolver()


@hydra.main(config_path="../configs", config_name="fault_trials", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    results = run_fault_trials(OmegaConf.to_container(cfg), HydraConfig.get().runtime.output_dir)
    if any(row["lost"] for row in results["rows"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
