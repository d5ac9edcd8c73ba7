"""Settings of a distillation run: the single source of the optimizer and loop defaults, and the
check of a whole training config that runs before any long work.

:class:`OptimSettings` and :class:`TrainerSettings` are also the structured configs of
``optim`` and ``trainer`` in ``configs/train.yaml`` (registered by :mod:`spar.configs` as
``schema/optim`` and ``schema/trainer``): the YAML writes only values that differ from these
defaults. Types are loose where several forms are accepted (``betas``, ``grad_clip``), so that
the checks here give the errors. :func:`check_training_config` checks every value a run
reads (``trainer``, ``optim``, ``teacher``, ``train_images``, ``heldout``, ``resume``,
``max_image_pixels``) and names the key and the value of the first bad one, so a typo fails in
seconds instead of after the teacher-cache fill.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SettingError, is_int_not_bool, require, require_bool, require_int
from ..utils import PRECISIONS

SCHEDULES = ("constant", "cosine")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class OptimSettings:
    """AdamW and its learning-rate schedule (the paper: lr 2e-5, weight decay 1e-4)."""

    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: Any = (0.9, 0.999)  # two numbers in [0, 1); a list from a config
    schedule: str = "constant"  # constant | cosine (to zero)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        require(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {SCHEDULES}")
        require(_is_number(self.lr) and self.lr > 0, "optim.lr", self.lr, "a number > 0")
        require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        betas = list(self.betas) if isinstance(self.betas, list | tuple) else None
        require(
            betas is not None
            and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas),
            "optim.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        require_int("optim.warmup_steps", self.warmup_steps, 0)
        self.betas = tuple(self.betas)


@dataclass
class TrainerSettings:
    """Loop settings.

    Attributes:
        epochs: passes over the training views.
        accumulate: micro-steps (views) per optimizer step.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        precision: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``
            (with loss scaling); autocast covers student and teacher.
        batch_size: views per micro-batch; above 1, views are grouped into same-size batches
            (size buckets, see ``spar.distill.buckets``).
        log_every: optimizer steps between JSONL log records.
        checkpoint_every: optimizer steps between mid-epoch checkpoints (0: epoch ends only).
        stop_after_steps: stop (checkpointed, resumable) after this many optimizer steps,
            e.g. to fit a job's time limit; the schedule still spans all epochs.
        num_workers: data-loading worker processes.
        seed: seeds the epoch permutations and the global RNGs.
        show_progress: draw a tqdm bar on rank 0.
        tensorboard: also write the logged scalars as TensorBoard events in ``out_dir/tb``
            (needs the ``tensorboard`` package).
    """

    epochs: int = 10
    accumulate: int = 1
    grad_clip: Any = None  # a number > 0, or None
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    batch_size: int = 1
    num_workers: int = 4
    seed: int = 0
    show_progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        require(
            self.precision in PRECISIONS,
            "trainer.precision",
            self.precision,
            f"one of {PRECISIONS}",
        )
        for name in ("epochs", "accumulate", "log_every", "batch_size"):
            require_int(f"trainer.{name}", getattr(self, name), 1)
        require_int("trainer.checkpoint_every", self.checkpoint_every, 0)
        require_int("trainer.stop_after_steps", self.stop_after_steps, 1, optional=True)
        require_int("trainer.num_workers", self.num_workers, 0)
        require_int("trainer.seed", self.seed, 0)
        require(
            self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
            "trainer.grad_clip",
            self.grad_clip,
            "a number > 0 or null",
        )
        require_bool("trainer.show_progress", self.show_progress)
        require_bool("trainer.tensorboard", self.tensorboard)


def settings_from(kind: type, values: dict[str, Any], section: str) -> Any:
    """``kind(**values)``, with an unknown key named as ``<section>.<key>``."""
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingError(
            f"unknown setting(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return kind(**values)


def check_training_config(config: dict[str, Any]) -> tuple[OptimSettings, TrainerSettings]:
    """Check every value of a resolved ``train.yaml`` config that the run reads, before any
    long work; returns the optimizer and loop settings.

    Raises:
        SettingError: naming the key and the value (e.g. ``trainer.batch_size must be an
            integer >= 1, got 0``).
        FileNotFoundError: ``resume`` or ``heldout.root`` names something that is not there.
        WeightLoadingError: the ``resume`` training state cannot be read (the file is named).
        ImportError: ``trainer.tensorboard=true`` without the ``tensorboard`` package.
    """
    from ..models.compiling import check_compile_setting
    from ..models.teacher_config import check_teacher_settings
    from .checkpointing import check_resumable  # checkpointing imports torch models

    optim = settings_from(OptimSettings, dict(config["optim"]), "optim")
    trainer = settings_from(TrainerSettings, dict(config["trainer"]), "trainer")
    if trainer.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError("trainer.tensorboard=true needs: pip install tensorboard") from error
    teacher = config["teacher"]
    require_bool("teacher.cache", teacher.get("cache", True))
    if teacher.get("cache", True):
        cache_dir = teacher.get("cache_dir")
        require(
            isinstance(cache_dir, str | Path) and str(cache_dir) != "",
            "teacher.cache_dir",
            cache_dir,
            "a folder",
        )
    check_teacher_settings(teacher, config["backbone"]["name"])
    data = config["train_images"]
    require_int("train_images.max_images", data.get("max_images"), 1, optional=True)
    require_int("train_images.draws_per_image", data.get("draws_per_image", 1), 1)
    require_int("train_images.augment_seed", data.get("augment_seed", 0), 0)
    _check_heldout(config["heldout"])
    require_int("max_image_pixels", config.get("max_image_pixels"), 1, optional=True)
    check_compile_setting(config.get("compile", False))
    if config.get("resume") is not None:
        check_resumable(config["resume"])
    return optim, trainer


def _check_heldout(heldout: dict[str, Any]) -> None:
    require_int("heldout.num_images", heldout.get("num_images"), 0)
    root = heldout.get("root")
    if root and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"heldout.root: held-out image folder {root} not found")
    sizes = heldout.get("sizes")
    pair_ok = isinstance(sizes, list | tuple) and all(
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(is_int_not_bool(s) and s > 0 for s in size)
        for size in sizes
    )
    require(pair_ok, "heldout.sizes", sizes, "a list of [long, short] pairs of positive integers")
    if heldout["num_images"] > 0:
        require(len(sizes) > 0, "heldout.sizes", sizes, "non-empty when heldout.num_images > 0")
