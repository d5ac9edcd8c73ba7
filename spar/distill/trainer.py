"""The distillation loop: the student regresses the teacher's maps, one micro-batch at a time.

Views differ in size, so every micro-step takes one view (batch size one, as in the paper) or a
micro-batch of same-size views (size buckets), and ``accumulate`` micro-steps make one optimizer
step. Under torchrun each rank takes its own views of a shared per-epoch permutation (padded so
that all ranks take the same number of steps) and DDP averages gradients at the last micro-step
of each optimizer step.

The loop itself is ``loop.TrainLoop`` (epochs of optimizer steps, hooks called around them);
logging, held-out checks, checkpoints, stopping and TensorBoard are hooks (``hooks``). The other
pieces live beside it: the batch sampler in ``buckets``, the update in ``optimization``, teacher
maps in ``targets``, checkpoint files in ``checkpointing``, the log file in ``run_log``.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..config import renamed_arguments
from ..distributed import DistributedContext
from .buckets import SizeBucketBatchSampler
from .checkpointing import resume_training, save_training_checkpoint
from .data import DistillationViews, collate_views
from .heldout import HeldoutSet, agreement
from .hooks import CheckpointHook, HeldoutHook, MetricsLogHook, StopAfterSteps, TensorBoardHook
from .loop import HookBase, TrainLoop, accumulation_groups
from .optimization import StudentOptimizer
from .run_log import RunLog
from .settings import OptimSettings, TrainerSettings
from .targets import TeacherTargets


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue the same trajectory."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # micro-batches of ``epoch`` already taken by each rank
    images_seen: int = 0
    skipped_files: list[str] = field(default_factory=list)
    best_mse: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Distiller(TrainLoop):
    """Trains ``student``'s trainable parameters to reproduce the teacher's maps.

    The loop (:class:`~spar.distill.loop.TrainLoop`) calls hooks around epochs and optimizer
    steps: first :meth:`default_hooks` (TensorBoard, stop after steps, held-out checks, the
    ``metrics.jsonl`` log, checkpoints), then those passed as ``hooks`` or added with
    :meth:`register_hooks`. A hook from a notebook::

        from spar.distill import HookBase

        class StopWhenLossBelow(HookBase):
            def __init__(self, threshold):
                self.threshold, self.losses = threshold, []

            def after_step(self):  # after every optimizer step
                self.losses.append((self.trainer.state.step, self.trainer.step_loss))
                if self.trainer.step_loss < self.threshold:
                    self.trainer.request_stop()  # checkpointed and resumable

        hook = StopWhenLossBelow(1e-3)
        distiller = Distiller(student, targets, views, heldout, "runs/x", optim, settings,
                              hooks=[hook])  # or distiller.register_hooks([hook])
        summary = distiller.fit()  # summary["stopped_early"] is True if the hook stopped it

    Args:
        student: a dense backbone with the parameters to train set to ``requires_grad``.
        targets: the teacher's maps (the frozen sliding-window teacher, a separate copy of the
            pretrained model, and its cache): views whose stored map was not read are computed
            in the step (and stored when there is a cache).
        views: the training views (keyed by ``targets`` for the cached teacher).
        heldout: held-out sets evaluated before training and after every epoch; the first one
            decides which checkpoint is the best.
        out_dir: run directory (``metrics.jsonl``, ``checkpoints/``).
        optim, settings: see :class:`OptimSettings`, :class:`TrainerSettings`.
        context: rank, world size and device (``spar.distributed.init_distributed``).
        run_info: JSON-serialisable description (the resolved config) stored in checkpoints
            and in the summary.
        fingerprint: what the run is made from (``spar.distill.fingerprint``), stored in every
            checkpoint with the settings changes that resumes made (``changes``).
        skipped_files: images already found unreadable (e.g. while filling the cache).
        hooks: more hooks (:class:`~spar.distill.loop.HookBase`), called after the defaults.

    Attributes a hook reads: ``state`` (:class:`TrainingState`: ``step``, ``epoch``, ...),
    ``step_loss`` and ``step_losses`` (the last optimizer step on this rank), ``resumed``,
    ``heldout_results``, ``log``, ``context``, ``optimization``, ``progress``, ``settings``.
    """

    @renamed_arguments()
    def __init__(
        self,
        student: nn.Module,
        targets: TeacherTargets,
        views: DistillationViews,
        heldout: Sequence[HeldoutSet],
        out_dir: str | Path,
        optim: OptimSettings,
        settings: TrainerSettings,
        context: DistributedContext | None = None,
        run_info: dict[str, Any] | None = None,
        skipped_files: Sequence[str] = (),
        hooks: Sequence[HookBase] = (),
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.context = context or DistributedContext()
        self.device = self.context.device
        self.student = student.to(self.device)
        self.targets = targets
        self.targets.teacher.to(self.device)
        self.views = views
        self.heldout = list(heldout)
        self.settings = settings
        self.run_info = run_info or {}
        self.optim = optim
        self.fingerprint = fingerprint
        # Settings that resumes changed (resume_allow): {key, old, new, step}, oldest first.
        self.changes: list[dict[str, Any]] = []
        self.sampler = SizeBucketBatchSampler(
            views, settings.batch_size, settings.seed, self.context.rank, self.context.world_size
        )
        total_steps = sum(
            math.ceil(len(self.sampler.batches(epoch)) / settings.accumulate)
            for epoch in range(settings.epochs)
        )
        model = self.student
        if self.context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.student, device_ids=device_ids)
        self.optimization = StudentOptimizer(
            self.student,
            optim,
            device=self.device,
            total_steps=total_steps,
            precision=settings.precision,
            grad_clip=settings.grad_clip,
            model=model,
        )
        self.state = TrainingState(skipped_files=sorted(set(skipped_files)))
        self.checkpoint_dir = Path(out_dir) / "checkpoints"
        self.out_dir = Path(out_dir)
        self.log = RunLog(out_dir, enabled=self.context.is_main)
        self.resumed = False
        self.heldout_results: dict[str, dict[str, float]] = {}
        self.step_losses: list[tuple[float, int]] = []  # (loss, views) of each micro-batch
        self.progress = None  # the epoch's progress bar (tqdm; disabled off rank 0)
        self._epoch_batches = 0  # micro-batches of the current epoch on this rank
        self.register_hooks(self.default_hooks())
        self.register_hooks(hooks)

    def default_hooks(self) -> list[HookBase]:
        """The hooks every run has, in the order they are called (see ``spar.distill.hooks``)."""
        settings, is_main = self.settings, self.context.is_main
        stop = settings.stop_after_steps
        return [
            TensorBoardHook(self.out_dir, enabled=is_main) if settings.tensorboard else None,
            StopAfterSteps(stop) if stop is not None else None,
            HeldoutHook(),
            MetricsLogHook(settings.log_every),
            CheckpointHook(settings.checkpoint_every),
        ]

    @property
    def step_loss(self) -> float:
        """Mean loss over this rank's views of the last optimizer step (0.0 if none was used)."""
        used = sum(count for _, count in self.step_losses)
        return sum(loss * count for loss, count in self.step_losses) / max(used, 1)

    # -- one micro-batch -----------------------------------------------------------------------

    def train_step(
        self, batch: dict[str, Any], *, accumulated: int = 1, update: bool = True
    ) -> tuple[float, int]:
        """Train on one micro-batch (``collate_views``): teacher maps, forward, MSE, backward of
        ``loss / accumulated``, and the optimizer step when ``update`` (the last micro-batch of
        an accumulation group). Returns the micro-batch's loss and the number of views used.

        Unreadable images are recorded and left out; if none is left, a zero-weighted pass
        keeps every DDP rank running the same passes.
        """
        for path, reason in batch["skipped"]:
            warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
            if path not in self.state.skipped_files:
                self.state.skipped_files.append(path)
        if batch["images"] is None:
            self.optimization.idle_step(accumulated=accumulated, update=update)
            loss, used = 0.0, 0
        else:
            images = batch["images"].to(self.device, non_blocking=True)
            targets = torch.stack(
                [
                    self._target(item, image)
                    for item, image in zip(batch["items"], images, strict=True)
                ]
            )
            paths = ", ".join(item["path"] for item in batch["items"])
            loss = self.optimization.train_step(
                images,
                targets,
                accumulated=accumulated,
                update=update,
                what=f"the loss at step {self.state.step} (images: {paths})",
            ).item()
            used = len(batch["items"])
        self.state.images_seen += used
        self.state.step += int(update)
        return loss, used

    def _target(self, item: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        """(C, h, w) float32 teacher map of one view: as read by the loader, or computed."""
        if item["target"] is not None:
            return item["target"].to(self.device, non_blocking=True).float()
        source = f"{item['path']} (view {item['index']}) at step {self.state.step}"
        return self.targets.compute(image, item["key"], source)

    # -- held-out evaluation and checkpoints ---------------------------------------------------

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Agreement on every held-out set (rank 0 computes, the others wait)."""
        results = {}
        if self.context.is_main:
            for heldout in self.heldout:
                results[heldout.name] = agreement(
                    self.student, heldout, self.device, self.optimization.autocast
                )
        self.context.barrier()
        return results

    def save(self, heldout: dict[str, dict[str, float]] | None = None) -> None:
        """Write ``last`` (weights + training state); also ``best`` when held-out improves."""
        if self.context.is_main:
            improved = False
            if heldout and self.heldout:
                mse = heldout[self.heldout[0].name]["mse"]
                improved = mse < self.state.best_mse
                self.state.best_mse = min(mse, self.state.best_mse)
            extra = {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "run": self.run_info,
                "heldout": heldout or {},
                "fingerprint": self.fingerprint,
                "changes": self.changes,
            }
            training_state = {
                "state": asdict(self.state),
                **self.optimization.state_dict(),
                "total_steps": self.optimization.total_steps,
                "log_records": self.log.records,  # metrics.jsonl lines this checkpoint saw
            }
            save_training_checkpoint(
                self.checkpoint_dir, self.student, extra, training_state, best=improved
            )
        self.context.barrier()

    def resume(
        self, path: str | Path, changes: Mapping[str, tuple[Any, Any]] | None = None
    ) -> None:
        """Restore weights, optimizer, scheduler, loss scaler, counters and RNGs from a run
        (see ``spar.distill.checkpointing.resume_training``).

        The optimizer's hyperparameters (learning rate, betas, weight decay) and the
        scheduler's base rates are then set from this run's ``optim`` settings, not kept from
        the saved state: a resumed run trains with the settings it records. ``changes``
        (``key -> (old, new)``, the differences ``resume_allow`` let through, see
        ``spar.distill.fingerprint.check_resume``) are added to :attr:`changes` with the step
        they took effect at (the optimizer steps done before them), written to the log as a
        ``resume_changes`` record and stored in every later checkpoint.
        """
        saved = resume_training(path, self.student)
        if saved["total_steps"] != self.optimization.total_steps and not changes:
            warnings.warn(
                f"resuming a run planned for {saved['total_steps']} steps with "
                f"{self.optimization.total_steps}; the learning-rate schedule will differ",
                stacklevel=2,
            )
        known_skipped = self.state.skipped_files
        self.state = TrainingState(**saved["state"])
        self.state.skipped_files = sorted(set(self.state.skipped_files) | set(known_skipped))
        self.optimization.load_state_dict(saved)
        self._use_optim_settings()
        self.log.rewind(saved.get("log_records"))  # drop records written after the checkpoint
        extra = saved.get("extra") if isinstance(saved.get("extra"), dict) else {}
        self.changes = [dict(change) for change in extra.get("changes") or []]
        new = [
            {"key": key, "old": old, "new": value, "step": self.state.step}
            for key, (old, value) in (changes or {}).items()
        ]
        if new:
            self.changes += new
            self.log.write({"event": "resume_changes", "step": self.state.step, "changes": new})
            described = "; ".join(f"{c['key']}: {c['old']} -> {c['new']}" for c in new)
            warnings.warn(
                f"resuming {path} at step {self.state.step} with changed settings "
                f"(resume_allow): {described}",
                stacklevel=2,
            )

    def _use_optim_settings(self) -> None:
        """Set the loaded optimizer's hyperparameters and the scheduler's base rates from
        ``self.optim``: ``load_state_dict`` brings back the saved ones, which would silently
        win over a changed setting. The current rate is the scheduler's formula
        (base rate x factor at its step), so an unchanged rate comes back bitwise equal."""
        optimizer = self.optimization.optimizer
        scheduler = self.optimization.scheduler
        for group in optimizer.param_groups:
            group["initial_lr"] = self.optim.lr
            group["weight_decay"] = self.optim.weight_decay
            group["betas"] = tuple(self.optim.betas)
        scheduler.base_lrs = [self.optim.lr for _ in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = self.optim.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    # -- the loop ------------------------------------------------------------------------------

    def fit(
        self,
        resume: str | Path | None = None,
        changes: Mapping[str, tuple[Any, Any]] | None = None,
    ) -> dict[str, Any]:
        """Train, evaluate, checkpoint; returns the summary (see :meth:`summary`). ``resume``
        and ``changes``: see :meth:`resume`."""
        seed_everything(self.settings.seed)
        self.resumed = resume is not None
        if resume is not None:
            self.resume(resume, changes)
        images_at_start = self.state.images_seen
        stopped_early = self.train()
        images = (self.state.images_seen - images_at_start) * self.context.world_size
        self.state.skipped_files = self.context.union(self.state.skipped_files)
        return self.summary(self.train_seconds, images, stopped_early)

    def epochs_left(self) -> bool:
        return self.state.epoch < self.settings.epochs

    @contextlib.contextmanager
    def epoch_steps(self) -> Iterator[Iterator[Iterable[tuple[int, dict[str, Any]]]]]:
        """The optimizer steps of the epoch (or its rest, after a resume): groups of
        (position, micro-batch) pairs from this rank's loader, under a progress bar."""
        settings = self.settings
        self.views.set_epoch(self.state.epoch)
        self.sampler.set_epoch(self.state.epoch, start=self.state.consumed)
        self._epoch_batches = len(self.sampler.batches(self.state.epoch))
        loader = DataLoader(
            self.views,
            batch_sampler=self.sampler,
            num_workers=settings.num_workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self.student.train()
        self.progress = self.context.progress(
            loader,
            settings.show_progress,
            total=len(self.sampler),
            desc=f"epoch {self.state.epoch + 1}/{settings.epochs}",
            unit="batch",
        )
        batches = enumerate(self.progress, start=self.state.consumed)
        try:
            yield accumulation_groups(
                batches, self.state.consumed, self._epoch_batches, settings.accumulate
            )
        finally:
            self.progress.close()

    def run_step(self, micro_batches: Iterable[tuple[int, dict[str, Any]]]) -> None:
        """One optimizer step: :meth:`train_step` on each micro-batch of its group."""
        accumulate, num_batches = self.settings.accumulate, self._epoch_batches
        self.step_losses = []
        for position, batch in micro_batches:
            group_start = position // accumulate * accumulate
            loss, used = self.train_step(
                batch,
                accumulated=min(accumulate, num_batches - group_start),
                update=(position + 1) % accumulate == 0 or position + 1 == num_batches,
            )
            self.step_losses.append((loss, used))
            self.state.consumed = position + 1

    def finish_epoch(self) -> None:
        self.state.epoch += 1
        self.state.consumed = 0

    def summary(self, seconds: float, images: int, stopped_early: bool) -> dict[str, Any]:
        """The run's results: held-out agreement before/after, counts, checkpoint paths."""
        history = self.state.history
        before = history[0] if history else {}
        after = history[-1] if history else {}
        first = self.heldout[0].name if self.heldout else None
        best = self.checkpoint_dir / "best.safetensors"
        dtype = self.optimization.dtype
        return {
            "heldout_mse_before": before.get(first, {}).get("mse"),
            "heldout_mse_after": after.get(first, {}).get("mse"),
            "heldout_cos_before": before.get(first, {}).get("cos"),
            "heldout_cos_after": after.get(first, {}).get("cos"),
            "heldout_sizes": {
                h.name: {
                    "images": len(h.paths),
                    "mse_before": before.get(h.name, {}).get("mse"),
                    "mse_after": after.get(h.name, {}).get("mse"),
                    "cos_before": before.get(h.name, {}).get("cos"),
                    "cos_after": after.get(h.name, {}).get("cos"),
                }
                for h in self.heldout
            },
            "heldout_history": history,
            "steps": self.state.step,
            "epochs_completed": self.state.epoch,
            "stopped_early": stopped_early,
            "images_seen": self.state.images_seen * self.context.world_size,
            "skipped_images": len(self.state.skipped_files),
            "skipped_files": self.state.skipped_files,
            "checkpoint": str(self.checkpoint_dir / "last.safetensors"),
            "best_checkpoint": str(best) if best.is_file() else None,
            "best_heldout_mse": None if math.isinf(self.state.best_mse) else self.state.best_mse,
            "seconds": seconds,
            "images_per_second": images / max(seconds, 1e-9),
            "world_size": self.context.world_size,
            "precision": str(dtype).replace("torch.", "") if dtype else "float32",
            "run": self.run_info,
            "changes": self.changes,
        }
