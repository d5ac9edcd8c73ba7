"""The distillation loop: the student regresses the teacher's maps, one micro-batch at a time.

Views differ in size, so every micro-step takes one view (batch size one, as in the paper) or a
micro-batch of same-size views (size buckets), and ``accumulate`` micro-steps make one optimizer
step. Under torchrun each rank takes its own views of a shared per-epoch permutation (padded so
that all ranks take the same number of steps) and DDP averages gradients at the last micro-step
of each optimizer step.

The pieces live beside it: the batch sampler in ``buckets``, the update in ``optimization``,
teacher maps in ``targets``, checkpoints in ``checkpointing``, the log in ``run_log``.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import renamed_arguments
from ..distributed import DistributedContext
from .buckets import SizeBucketBatchSampler
from .checkpointing import resume_training, save_training_checkpoint
from .data import DistillationViews, collate_views
from .heldout import HeldoutSet, agreement
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


class Distiller:
    """Trains ``student``'s trainable parameters to reproduce the teacher's maps.

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
        skipped_files: images already found unreadable (e.g. while filling the cache).
    """

    @renamed_arguments(
        teacher="targets=TeacherTargets(teacher, root, cache=...)",
        cache="targets=TeacherTargets(teacher, root, cache=...)",
    )
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
    ) -> None:
        self.context = context or DistributedContext()
        self.device = self.context.device
        self.student = student.to(self.device)
        self.targets = targets
        self.targets.teacher.to(self.device)
        self.views = views
        self.heldout = list(heldout)
        self.settings = settings
        self.run_info = run_info or {}
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
        self.log = RunLog(out_dir, enabled=self.context.is_main, tensorboard=settings.tensorboard)

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

    def _record_heldout(self, when: str) -> dict[str, dict[str, float]]:
        results = self.evaluate()
        if self.context.is_main and results:
            record = {"event": "heldout", "when": when, "step": self.state.step, **results}
            self.state.history.append(record)
            self.log.write(record)
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

    def resume(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, loss scaler, counters and RNGs from a run
        (see ``spar.distill.checkpointing.resume_training``)."""
        saved = resume_training(path, self.student)
        if saved["total_steps"] != self.optimization.total_steps:
            warnings.warn(
                f"resuming a run planned for {saved['total_steps']} steps with "
                f"{self.optimization.total_steps}; the learning-rate schedule will differ",
                stacklevel=2,
            )
        known_skipped = self.state.skipped_files
        self.state = TrainingState(**saved["state"])
        self.state.skipped_files = sorted(set(self.state.skipped_files) | set(known_skipped))
        self.optimization.load_state_dict(saved)
        self.log.rewind(saved.get("log_records"))  # drop records written after the checkpoint

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train, evaluate, checkpoint; returns the summary (see :meth:`summary`)."""
        seed_everything(self.settings.seed)
        if resume is not None:
            self.resume(resume)
        else:
            self._record_heldout("before")
        start = time.perf_counter()
        images_at_start = self.state.images_seen
        stopped_early = False
        while self.state.epoch < self.settings.epochs and not stopped_early:
            stopped_early = self._run_epoch()
            if stopped_early:
                break
            self.state.epoch += 1
            self.state.consumed = 0
            results = self._record_heldout(f"epoch {self.state.epoch}")
            self.save(results)
        seconds = time.perf_counter() - start
        images = (self.state.images_seen - images_at_start) * self.context.world_size
        self.state.skipped_files = self.context.union(self.state.skipped_files)
        return self.summary(seconds, images, stopped_early)

    def _run_epoch(self) -> bool:
        """One epoch (or its rest, after a resume); True when ``stop_after_steps`` was hit."""
        settings = self.settings
        self.views.set_epoch(self.state.epoch)
        self.sampler.set_epoch(self.state.epoch, start=self.state.consumed)
        num_batches = len(self.sampler.batches(self.state.epoch))
        loader = DataLoader(
            self.views,
            batch_sampler=self.sampler,
            num_workers=settings.num_workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self.student.train()
        progress = self.context.progress(
            loader,
            settings.show_progress,
            total=len(self.sampler),
            desc=f"epoch {self.state.epoch + 1}/{settings.epochs}",
            unit="batch",
        )
        window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
        for position, batch in enumerate(progress, start=self.state.consumed):
            group_start = position // settings.accumulate * settings.accumulate
            update = (position + 1) % settings.accumulate == 0 or position + 1 == num_batches
            loss, used = self.train_step(
                batch,
                accumulated=min(settings.accumulate, num_batches - group_start),
                update=update,
            )
            window_loss += loss * used
            window_count += used
            self.state.consumed = position + 1
            if not update:
                continue
            if self.state.step % settings.log_every == 0:
                self._log_train(window_loss, window_count, window_start, progress)
                window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
            if settings.checkpoint_every and self.state.step % settings.checkpoint_every == 0:
                self.save()
            stop = settings.stop_after_steps
            if stop is not None and self.state.step >= stop:
                self.save()
                progress.close()
                return True
        progress.close()
        return False

    def _log_train(self, loss_sum: float, count: int, started: float, progress: tqdm) -> None:
        loss_sum, count = self.context.all_reduce_sum([loss_sum, count])
        elapsed = time.perf_counter() - started
        record = {
            "event": "train",
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss_sum / max(count, 1),
            "lr": self.optimization.learning_rate,
            "images_per_second": count / max(elapsed, 1e-9),
        }
        self.log.write(record)
        progress.set_postfix(
            loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_second']:.2f}"
        )

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
        }
