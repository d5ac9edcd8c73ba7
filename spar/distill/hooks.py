"""The hooks of the distillation loop, each with one job.

``Distiller`` registers them in this order (see ``Distiller.default_hooks``), then the user's:

- :class:`TensorBoardHook` (``trainer.tensorboard``): every log record as TensorBoard scalars.
- :class:`StopAfterSteps` (``trainer.stop_after_steps``): stops after that many steps.
- :class:`HeldoutHook`: held-out agreement before training and after every epoch.
- :class:`MetricsLogHook`: a ``train`` record (``metrics.jsonl``, progress bar) every
  ``trainer.log_every`` steps.
- :class:`CheckpointHook`: ``last``/``best`` checkpoints every ``trainer.checkpoint_every``
  steps, at every epoch end and when the run stops inside an epoch.

A hook reads the ``Distiller`` through ``self.trainer``: ``state`` (step, epoch, ...),
``step_loss`` (mean loss of the last optimizer step on this rank), ``log``, ``context``,
``heldout_results``; it may call ``request_stop()``. Every rank calls every hook (a hook that
uses a collective, such as ``MetricsLogHook``, relies on it); only rank 0 writes files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .loop import HookBase
from .run_log import scalars

__all__ = [
    "CheckpointHook",
    "HeldoutHook",
    "HookBase",
    "MetricsLogHook",
    "StopAfterSteps",
    "TensorBoardHook",
]


class StopAfterSteps(HookBase):
    """Requests a stop once ``steps`` optimizer steps are done (``trainer.stop_after_steps``,
    e.g. to fit a job's time limit; :class:`CheckpointHook` saves the stopped run)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def after_step(self) -> None:
        if self.trainer.state.step >= self.steps:
            self.trainer.request_stop()


class HeldoutHook(HookBase):
    """Held-out agreement before training (not when resuming) and after every epoch: a
    ``heldout`` record in the log and in ``trainer.state.history``. The results are kept in
    ``trainer.heldout_results`` (the epoch's checkpoint records them and decides ``best``)."""

    def before_train(self) -> None:
        if not self.trainer.resumed:
            self.record("before")

    def after_epoch(self) -> None:
        self.record(f"epoch {self.trainer.state.epoch}")

    def record(self, when: str) -> None:
        trainer = self.trainer
        results = trainer.evaluate()
        trainer.heldout_results = results
        if trainer.context.is_main and results:
            record = {"event": "heldout", "when": when, "step": trainer.state.step, **results}
            trainer.state.history.append(record)
            trainer.log.write(record)


class MetricsLogHook(HookBase):
    """Every ``every`` optimizer steps, a ``train`` record (mean loss over all ranks' views
    since the last record of the epoch, learning rate, images per second) in ``metrics.jsonl``
    and on the progress bar."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.images, self.started = 0.0, 0, time.perf_counter()

    def before_epoch(self) -> None:
        self.reset()

    def after_step(self) -> None:
        trainer = self.trainer
        for loss, used in trainer.step_losses:  # per micro-batch, in the order trained
            self.loss_sum += loss * used
            self.images += used
        if trainer.state.step % self.every == 0:
            self.write()
            self.reset()

    def write(self) -> None:
        trainer = self.trainer
        loss_sum, count = trainer.context.all_reduce_sum([self.loss_sum, self.images])
        elapsed = time.perf_counter() - self.started
        record = {
            "event": "train",
            "step": trainer.state.step,
            "epoch": trainer.state.epoch,
            "loss": loss_sum / max(count, 1),
            "lr": trainer.optimization.learning_rate,
            "images_per_second": count / max(elapsed, 1e-9),
        }
        trainer.log.write(record)
        trainer.progress.set_postfix(
            loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_second']:.2f}"
        )


class CheckpointHook(HookBase):
    """Writes the ``last`` checkpoint (``trainer.save``): every ``every`` optimizer steps (0:
    not inside epochs), at every epoch end with the epoch's held-out results (``best`` too when
    they improve), and when a stop is requested inside an epoch, so that the run resumes."""

    def __init__(self, every: int = 0) -> None:
        self.every = every

    def after_step(self) -> None:
        if self.every and self.trainer.state.step % self.every == 0:
            self.trainer.save()

    def after_epoch(self) -> None:
        self.trainer.save(self.trainer.heldout_results)

    def after_train(self) -> None:
        if self.trainer.stop_requested and self.trainer.state.consumed > 0:
            self.trainer.save()


class TensorBoardHook(HookBase):
    """Writes the numeric leaves of every log record (``train``, ``heldout``) as TensorBoard
    scalars in ``out_dir/tb``, from rank 0 (``enabled``).

    Raises:
        ImportError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "trainer.tensorboard=true needs: pip install tensorboard"
                ) from error
            self.writer = SummaryWriter(str(Path(out_dir) / "tb"))

    def before_train(self) -> None:
        if self.writer is not None:
            self.trainer.log.add_listener(self.write)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record):
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()
