"""Optimizer and loop settings of a distillation run: the single source of their defaults.

``configs/train.yaml`` spells the same defaults out (with comments) under ``optim`` and
``trainer``; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..utils import PRECISIONS

SCHEDULES = ("constant", "cosine")


@dataclass
class OptimSettings:
    """AdamW and its learning-rate schedule (the paper: lr 2e-5, weight decay 1e-4)."""

    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"  # constant | cosine (to zero)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and warmup_steps >= 0, got {self}")
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
    grad_clip: float | None = None
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {PRECISIONS}")
        if min(self.epochs, self.accumulate, self.log_every, self.batch_size) < 1:
            raise ValueError(
                f"epochs, accumulate, log_every and batch_size must be >= 1, got {self}"
            )
