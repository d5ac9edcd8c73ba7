"""``spar-speed``: measure student, teacher and training speed.

``spar-speed backbone=siglip2`` (also ``python -m spar.speed`` and ``scripts/speed.py``) prints the
tables and a training-recipe estimate, and writes speed_results.json and speed_strides.png in the
run folder (with profile=true also the profiler tables profile_student_<size>.txt and
profile_teacher_<size>_s<stride>.txt). The measurements are :mod:`spar.tools.speed`'s.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spar.config import reject_renamed_overrides, report_user_errors
from spar.deprecations import module_getattr
from spar.distributed import register_run_id_resolver
from spar.io import atomic_write_bytes, atomic_write_json
from spar.models import create_backbone
from spar.models.teacher_config import check_teacher_settings
from spar.tools import speed as measure
from spar.utils import configure_matmul_precision, resolve_device

register_run_id_resolver()


@hydra.main(config_path="pkg://spar.configs", config_name="speed", version_base="1.3")
@report_user_errors
def speed(cfg: DictConfig) -> None:
    """Measure as ``cfg`` (``spar/configs/speed.yaml``) says; print and save the results."""
    check_teacher_settings(OmegaConf.to_container(cfg.teacher), cfg.backbone.name)
    configure_matmul_precision(cfg.tf32)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    config = OmegaConf.to_container(cfg, resolve=True)
    precisions = config["precisions"] or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    recipe = config["recipe"]
    backbone = create_backbone(**config["backbone"])
    results = measure.measure_speed(
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
        precision: measure.recipe_estimate(results, recipe["images"], recipe["epochs"], precision)
        for precision in precisions
    }
    results["config"] = config
    stages = measure.stage_combinations(config["refine"], config["upsample"])
    if len(stages) > 1:
        results["stages"] = measure.measure_stages(
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
    measure.plot_strides(results, out_dir / "speed_strides.png")
    print(measure.format_table(results))
    if "stages" in results:
        print(measure.format_stage_table(results["stages"]))
    print(f"results in {out_dir}/speed_results.json and speed_strides.png")
    if config["profile"]:
        sizes = measure.resolve_sizes(config["sizes"], device)
        middle = sizes[len(sizes) // 2]
        for name, text in measure.profile_forwards(
            backbone, device, middle, config["teacher"], precisions
        ).items():
            atomic_write_bytes(out_dir / name, text.encode())
            print(f"profile: {out_dir / name}")


def main() -> None:
    """The command line: Hydra overrides in ``sys.argv``."""
    reject_renamed_overrides(sys.argv[1:], "speed")
    speed()


#: ``from spar.speed import measure_speed`` (the library before 0.2): an ImportError naming the
#: new home, :mod:`spar.tools.speed` (``time_call``: :mod:`spar.timing`); the table is
#: :data:`spar.deprecations.DEPRECATIONS`.
__getattr__ = module_getattr(__name__)


if __name__ == "__main__":
    main()
