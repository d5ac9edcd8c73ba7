"""From a resolved config to a training run: what ``scripts/train.py`` and
``scripts/cache_teacher.py`` call, usable from a notebook with a plain dict as well.

The config layout is that of ``configs/train.yaml``: ``backbone``, ``teacher`` (the
``configs/teacher`` group's window, stride and batch size, plus ``cache`` and ``cache_dir``),
``train_images``, ``heldout``, ``optim``, ``trainer``, ``device``, ``resume``. :func:`prepare`
checks it once into a typed :class:`~spar.distill.settings.DistillationSettings` and passes its
parts down; the resolved dict is kept only as the run's record (checkpoints, fingerprint).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from ..config import RENAMED_SETTINGS, SettingError, check_renamed
from ..data.images import list_images, set_max_image_pixels
from ..distributed import DistributedContext, init_distributed
from ..io import atomic_write_json
from ..models import build_teacher, create_backbone
from ..models.compiling import compile_report
from ..provenance import file_digest, same_folder, weights_digest
from ..utils import autocast_dtype, autocast_for
from .cache import TeacherFeatureCache
from .data import DistillationViews, ImageSplit, split_images
from .fingerprint import check_resume, training_fingerprint
from .heldout import HeldoutSet, build_heldout_sets
from .loop import HookBase
from .run_log import RunFolder, require_writable_folder
from .settings import (
    DistillationSettings,
    HeldoutSettings,
    OptimSettings,
    TrainerSettings,
    TrainImagesSettings,
    training_settings,
)
from .targets import TeacherTargets
from .trainer import Distiller


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
    """The pieces of a run, built from a config (see :func:`prepare`): ``settings``, checked
    and typed, and ``config``, the resolved dict kept as the run's record."""

    config: dict[str, Any]
    settings: DistillationSettings
    context: DistributedContext
    student: nn.Module
    targets: TeacherTargets
    split: ImageSplit
    root: Path
    views: DistillationViews
    fingerprint: dict[str, Any]  # what the run is made from (spar.distill.fingerprint)
    resume_changes: dict[str, tuple[Any, Any]]  # key -> (old, new) that resume_allow let through

    @property
    def optim(self) -> OptimSettings:
        return self.settings.optim

    @property
    def trainer(self) -> TrainerSettings:
        return self.settings.trainer


def _split(
    data: TrainImagesSettings, heldout: HeldoutSettings, root: Path
) -> tuple[ImageSplit, Path]:
    """The training and held-out images, and the held-out folder; a ``heldout.root`` whose
    images are training images too (the same folder, or the same files) is refused."""
    if heldout.root is None:
        paths = list_images(root)
        return split_images(paths, heldout.num_images, data.max_images), root
    heldout_root = heldout.root
    if same_folder(heldout_root, root):
        raise SettingError(
            f"heldout.root {heldout_root} is the training folder (train_images.root {root}): "
            "held-out images would be trained on; leave heldout.root null (the last "
            "heldout.num_images images are held out) or name a folder of other images"
        )
    heldout_paths = list_images(heldout_root)[: heldout.num_images]
    split = ImageSplit(list_images(root)[: data.max_images], heldout_paths)
    shared = _shared_files(split.heldout, split.train)
    if shared:
        names = ", ".join(str(path) for path in shared[:3]) + (", ..." if len(shared) > 3 else "")
        raise SettingError(
            f"heldout.root {heldout_root}: {len(shared)} held-out image(s) are also training "
            f"images of train_images.root {root} (the same file or the same bytes): {names}"
        )
    return split, heldout_root


def _shared_files(heldout: list[Path], train: list[Path]) -> list[Path]:
    """The held-out files that are training files too: the same file (device and inode: links,
    overlapping folders) or a byte-identical copy (compared by digest only where sizes match)."""
    by_size: dict[int, list[Path]] = {}
    inodes = set()
    for path in train:
        stat = path.stat()
        inodes.add((stat.st_dev, stat.st_ino))
        by_size.setdefault(stat.st_size, []).append(path)
    shared = []
    for path in heldout:
        stat = path.stat()
        same_size = by_size.get(stat.st_size, [])
        if (stat.st_dev, stat.st_ino) in inodes or (
            same_size and file_digest(path) in {file_digest(other) for other in same_size}
        ):
            shared.append(path)
    return shared


def prepare(cfg: DictConfig | dict, context: DistributedContext | None = None) -> DistillationSetup:
    """Build student, frozen teacher and its targets, split and views from a ``train.yaml``
    config. Every setting is checked here, once (``training_settings``: old spellings, bad
    values, a ``resume`` path that cannot be resumed), before any long work: the split (a
    ``heldout.root`` overlapping the training images is refused) and a writable
    ``teacher.cache_dir`` before any model is built, and, with ``resume``, the fingerprint the
    checkpoint recorded against this run's (``spar.distill.fingerprint.check_resume``;
    ``resume_allow`` lists the keys that may differ)."""
    config = _plain(cfg)
    check_renamed(config, RENAMED_SETTINGS["train"], "prepare")
    settings = training_settings(config)
    trainer, data, cache = settings.trainer, settings.train_images, settings.teacher
    set_max_image_pixels(settings.max_image_pixels)
    if cache.cache:
        require_writable_folder(cache.cache_dir, "teacher.cache_dir")
    root = data.folder
    split, heldout_root = _split(data, settings.heldout, root)
    context = context or init_distributed(settings.device)

    student = create_backbone(**settings.backbone.create_kwargs(), compile=settings.compile)
    base_weights = weights_digest(student)  # before any training step changes them
    frozen = copy.deepcopy(student).requires_grad_(False).eval().to(context.device)
    # The frozen copy serves only the teacher: a low precision converts it in place.
    teacher = build_teacher(frozen, cache.settings, trainer.precision, copy_backbone=False)
    precision = autocast_dtype(trainer.precision, context.device)
    fingerprint = training_fingerprint(
        config,
        weights=base_weights,
        teacher=teacher,
        precision=str(precision or "float32").removeprefix("torch."),
        split=split,
        root=root,
        heldout_root=heldout_root,
    )
    changes = {}
    if settings.resume is not None:
        changes = check_resume(settings.resume, fingerprint, settings.resume_allow)

    targets = TeacherTargets(
        teacher,
        root,
        cache=TeacherFeatureCache(cache.cache_dir) if cache.cache else None,
        autocast=autocast_for(trainer.precision, context.device),
        name=settings.backbone.name,
    )
    views = DistillationViews(
        split.train,
        root,
        data.augment,
        student.mean,
        student.std,
        augment_seed=data.augment_seed,
        draws_per_image=data.draws_per_image,
        fixed_views=cache.cache,
        targets=targets if cache.cache else None,
    )
    return DistillationSetup(
        config, settings, context, student, targets, split, root, views, fingerprint, changes
    )


def _require_cache(setup: DistillationSetup) -> None:
    if setup.targets.cache is None:
        raise ValueError("teacher.cache is false (online teacher): there is no cache to fill")


def fill_cache(setup: DistillationSetup) -> dict[str, Any]:
    """Fill the teacher cache for the training views of ``setup`` (sharded over ranks)."""
    _require_cache(setup)
    return setup.targets.fill(
        setup.views,
        setup.context,
        num_workers=setup.trainer.num_workers,
        show_progress=setup.trainer.show_progress,
    )


def heldout_sets(setup: DistillationSetup) -> tuple[list[HeldoutSet], list[str]]:
    """Held-out sets with teacher maps (rank 0 only; from/to the cache when there is one)."""
    heldout = setup.settings.heldout
    if not setup.context.is_main or heldout.num_images <= 0:
        return [], []
    return build_heldout_sets(setup.split.heldout, heldout.sizes, setup.targets)


def fill_heldout_cache(setup: DistillationSetup) -> list[str]:
    """Cache the held-out teacher maps too; returns the unreadable held-out files."""
    _require_cache(setup)
    _, unreadable = heldout_sets(setup)
    setup.context.barrier()
    return unreadable


def run_distillation(
    cfg: DictConfig | dict, out_dir: str | Path, hooks: Sequence[HookBase] = ()
) -> dict[str, Any]:
    """Fill the cache (cached teacher), train, evaluate held-out agreement; returns the summary,
    which rank 0 writes to ``out_dir/train_summary.json`` (its only writer). ``hooks`` are
    added to the training loop's (``Distiller(..., hooks=...)``, see ``spar.distill.hooks``).

    ``out_dir`` must not hold another run unless ``resume`` points into it (the run then
    continues there); rank 0 holds a lock on it for the whole run (``RunFolder``). A folder
    that cannot be written is refused before anything is built."""
    require_writable_folder(out_dir, "the run folder")
    if (Path(out_dir) / "checkpoints").is_dir():  # a run folder resumed in place
        require_writable_folder(Path(out_dir) / "checkpoints", "the checkpoint folder")
    setup = prepare(cfg)
    # Rank 0 is the one writer of the run folder: refuse one that holds another run (unless
    # resuming it) or that another process writes, before the cache fill.
    folder = RunFolder(out_dir, setup.settings.resume) if setup.context.is_main else None
    try:
        return _distil(setup, out_dir, hooks)
    finally:
        if folder is not None:
            folder.release()


def _distil(
    setup: DistillationSetup, out_dir: str | Path, hooks: Sequence[HookBase]
) -> dict[str, Any]:
    config, context = setup.config, setup.context
    cached = setup.targets.cache is not None
    cache_stats = fill_cache(setup) if cached else None
    heldout, unreadable = heldout_sets(setup)
    context.barrier()
    distiller = Distiller(
        setup.student,
        setup.targets,
        setup.views,
        heldout,
        out_dir,
        setup.optim,
        setup.trainer,
        context=context,
        run_info=config,
        skipped_files=(cache_stats or {}).get("skipped_files", []),
        hooks=hooks,
        fingerprint=setup.fingerprint,
    )
    summary = distiller.fit(resume=setup.settings.resume, changes=setup.resume_changes)
    summary["train_images"] = len(setup.split.train)
    summary["train_views"] = len(setup.views)
    summary["heldout_images"] = len(setup.split.heldout)
    summary["heldout_unreadable"] = unreadable
    summary["compile"] = compile_report(setup.student)
    if cache_stats is not None:
        summary["cache"] = {k: v for k, v in cache_stats.items() if k != "skipped_files"}
    if context.is_main:
        atomic_write_json(Path(out_dir) / "train_summary.json", summary)
    return summary
