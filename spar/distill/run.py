"""From a resolved config to a training run: what ``scripts/train.py`` and
``scripts/cache_teacher.py`` call, usable from a notebook with a plain dict as well.

The config layout is that of ``configs/train.yaml``: ``backbone``, ``train.unfreeze``,
``teacher``, ``data``, ``heldout``, ``optim``, ``trainer``, ``device``, ``resume``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from ..data.images import list_images
from ..distributed import DistributedContext, init_distributed
from ..io import atomic_write_json
from ..models import SlidingWindowTeacher, create_backbone
from ..utils import autocast_for
from .augment import AugmentationRecipe
from .cache import TeacherFeatureCache, teacher_identity
from .data import DistillationViews, ImageSplit, split_images
from .heldout import build_heldout_sets
from .targets import fill_teacher_cache
from .trainer import Distiller, OptimSettings, TrainerSettings

TEACHER_MODES = ("cached", "online")


def _plain(cfg: DictConfig | dict) -> dict[str, Any]:
    if not isinstance(cfg, DictConfig):
        return copy.deepcopy(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ValueError(
            f"the setting {error.full_key} is required: add {error.full_key}=... to the command"
        ) from error


@dataclass
class DistillationSetup:
    """The pieces of a run, built from a config (see :func:`prepare`)."""

    config: dict[str, Any]
    context: DistributedContext
    student: nn.Module
    teacher: SlidingWindowTeacher
    identity: dict[str, Any]
    split: ImageSplit
    root: Path
    views: DistillationViews
    cache: TeacherFeatureCache | None


def image_root(data: dict[str, Any]) -> Path:
    """``data.root``, or the bundled sample images when it is ``None``."""
    if data.get("root") is None:
        from ..demo import SAMPLE_IMAGES

        return SAMPLE_IMAGES
    return Path(data["root"]).expanduser()


def prepare(cfg: DictConfig | dict, context: DistributedContext | None = None) -> DistillationSetup:
    """Build student, frozen teacher, split, views and cache from a ``train.yaml`` config."""
    config = _plain(cfg)
    context = context or init_distributed(config.get("device", "auto"))
    teacher_cfg, data = config["teacher"], config["data"]
    if teacher_cfg["mode"] not in TEACHER_MODES:
        raise ValueError(
            f"teacher.mode must be one of {TEACHER_MODES}, got {teacher_cfg['mode']!r}"
        )

    backbone_cfg = dict(config["backbone"])
    backbone_cfg["trainable_blocks"] = config["train"]["unfreeze"]
    student = create_backbone(**backbone_cfg)
    frozen = copy.deepcopy(student).requires_grad_(False).eval()
    teacher = SlidingWindowTeacher(
        frozen,
        window=teacher_cfg.get("window"),
        stride=teacher_cfg["stride"],
        batch_size=teacher_cfg["batch_size"],
    )
    identity = teacher_identity(teacher, name=backbone_cfg["name"])
    teacher.to(context.device)

    root = image_root(data)
    heldout_cfg = config["heldout"]
    if heldout_cfg.get("root"):
        heldout_paths = list_images(heldout_cfg["root"])[: heldout_cfg["num_images"]]
        split = ImageSplit(list_images(root)[: data.get("max_images")], heldout_paths)
    else:
        split = split_images(list_images(root), heldout_cfg["num_images"], data.get("max_images"))

    cached = teacher_cfg["mode"] == "cached"
    cache = TeacherFeatureCache(teacher_cfg["cache_dir"]) if cached else None
    views = DistillationViews(
        split.train,
        root,
        AugmentationRecipe.from_dict(data["augment"]),
        student.mean,
        student.std,
        augment_seed=data.get("augment_seed", 0),
        draws_per_image=data.get("draws_per_image", 1),
        fixed_views=cached,
        cache=cache,
        teacher_identity=identity if cached else None,
    )
    return DistillationSetup(config, context, student, teacher, identity, split, root, views, cache)


def _teacher_autocast(setup: DistillationSetup):
    return autocast_for(setup.config["trainer"]["precision"], setup.context.device)


def fill_cache(setup: DistillationSetup) -> dict[str, Any]:
    """Fill the teacher cache for the training views of ``setup`` (sharded over ranks)."""
    if setup.cache is None:
        raise ValueError("teacher.mode is 'online': there is no cache to fill")
    return fill_teacher_cache(
        setup.teacher,
        setup.views,
        setup.cache,
        setup.context,
        autocast=_teacher_autocast(setup),
        num_workers=setup.config["trainer"]["num_workers"],
        show_progress=setup.config["trainer"].get("show_progress", True),
    )


def heldout_sets(setup: DistillationSetup) -> tuple[list, list[str]]:
    """Held-out sets with teacher maps (rank 0 only; from/to the cache in cached mode)."""
    config = setup.config
    if not setup.context.is_main or config["heldout"]["num_images"] <= 0:
        return [], []
    return build_heldout_sets(
        setup.split.heldout,
        config["heldout"]["sizes"],
        setup.teacher,
        setup.context.device,
        autocast=_teacher_autocast(setup),
        cache=setup.cache,
        teacher_identity=setup.identity,
        root=setup.root,
    )


def fill_heldout_cache(setup: DistillationSetup) -> list[str]:
    """Cache the held-out teacher maps too; returns the unreadable held-out files."""
    if setup.cache is None:
        raise ValueError("teacher.mode is 'online': there is no cache to fill")
    _, unreadable = heldout_sets(setup)
    setup.context.barrier()
    return unreadable


def run_distillation(cfg: DictConfig | dict, out_dir: str | Path) -> dict[str, Any]:
    """Fill the cache (cached mode), train, evaluate held-out agreement; returns the summary.

    The summary is also written to ``out_dir/train_summary.json`` by rank 0.
    """
    setup = prepare(cfg)
    config, context = setup.config, setup.context
    cache_stats = fill_cache(setup) if setup.cache is not None else None
    heldout, unreadable = heldout_sets(setup)
    context.barrier()
    distiller = Distiller(
        setup.student,
        setup.teacher,
        setup.views,
        heldout,
        out_dir,
        OptimSettings(**config["optim"]),
        TrainerSettings(**config["trainer"]),
        context=context,
        cache=setup.cache,
        run_info=config,
        skipped_files=(cache_stats or {}).get("skipped_files", []),
    )
    summary = distiller.fit(resume=config.get("resume"))
    summary["teacher_mode"] = config["teacher"]["mode"]
    summary["train_images"] = len(setup.split.train)
    summary["train_views"] = len(setup.views)
    summary["heldout_images"] = len(setup.split.heldout)
    summary["heldout_unreadable"] = unreadable
    if cache_stats is not None:
        summary["cache"] = {k: v for k, v in cache_stats.items() if k != "skipped_files"}
    if context.is_main:
        atomic_write_json(Path(out_dir) / "train_summary.json", summary)
    return summary
