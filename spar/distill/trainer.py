"""The distillation loop: the student regresses the teacher's maps, one view per micro-step.

Views differ in size, so every micro-step takes one view (batch size one, as in the paper) and
``accumulate`` micro-steps make one optimizer step. Under torchrun each rank takes its own views
of a shared per-epoch permutation (padded so that all ranks take the same number of steps) and
DDP averages gradients at the last micro-step of each optimizer step.
"""

from __future__ import annotations

import contextlib
import io
import json
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
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..distributed import DistributedContext
from ..io import atomic_write_bytes, atomic_write_json
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.weights import WeightLoadingError, read_weight_file
from ..utils import PRECISIONS, autocast_dtype, check_finite
from .buckets import bucket_batches, image_size
from .cache import TeacherFeatureCache
from .data import DistillationViews, collate_views
from .heldout import HeldoutSet, agreement
from .targets import teacher_map

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
    num_workers: int = 2
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


def learning_rate_factor(step: int, total: int, settings: OptimSettings) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` of ``total``."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "cosine":
        progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Distiller:
    """Trains ``student``'s trainable parameters to reproduce ``teacher``'s maps.

    Args:
        student: a dense backbone with the parameters to train set to ``requires_grad``.
        teacher: the frozen sliding-window teacher (a separate copy of the pretrained model).
        views: the training views; with ``cache`` their targets come from disk (missing or bad
            entries are computed here and written back), otherwise the teacher runs in the step.
        heldout: held-out sets evaluated before training and after every epoch; the first one
            decides which checkpoint is the best.
        out_dir: run directory (``metrics.jsonl``, ``checkpoints/``, ``train_summary.json``).
        optim, settings: see :class:`OptimSettings`, :class:`TrainerSettings`.
        context: rank, world size and device (``spar.distributed.init_distributed``).
        cache: the teacher-feature cache, for the cached mode.
        run_info: JSON-serialisable description (the resolved config) stored in checkpoints
            and in the summary.
        skipped_files: images already found unreadable (e.g. while filling the cache).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        views: DistillationViews,
        heldout: Sequence[HeldoutSet],
        out_dir: str | Path,
        optim: OptimSettings,
        settings: TrainerSettings,
        context: DistributedContext | None = None,
        cache: TeacherFeatureCache | None = None,
        run_info: dict[str, Any] | None = None,
        skipped_files: Sequence[str] = (),
    ) -> None:
        self.context = context or DistributedContext()
        self.device = self.context.device
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval()
        self.teacher.requires_grad_(False)
        self.views = views
        self.heldout = list(heldout)
        self.out_dir = Path(out_dir)
        self.optim = optim
        self.settings = settings
        self.cache = cache
        self.run_info = run_info or {}
        self.parameters = [p for p in self.student.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the student has no trainable parameters (trainable_blocks='none'?)")
        self.dtype = autocast_dtype(settings.precision, self.device)
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas
        )
        self._source_sizes = None
        self.total_steps = sum(
            math.ceil(len(self.epoch_batches(epoch)) / settings.accumulate)
            for epoch in range(settings.epochs)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, self.total_steps, optim)
        )
        use_scaler = self.dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.model: nn.Module = self.student
        if self.context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.student, device_ids=device_ids)
        self.state = TrainingState(skipped_files=sorted(set(skipped_files)))
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.tensorboard = None
        if settings.tensorboard and self.context.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "trainer.tensorboard=true needs: pip install tensorboard"
                ) from error
            self.tensorboard = SummaryWriter(str(self.out_dir / "tb"))

    # -- small helpers -------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of view indices) for ``epoch``."""
        settings = self.settings
        sizes: list = [None] * len(self.views)
        if settings.batch_size > 1:
            if self._source_sizes is None:  # file headers only, read once
                self._source_sizes = [image_size(p) for p in self.views.paths]
            sizes = [
                self.views.view_size(index, self._source_sizes, epoch)
                for index in range(len(self.views))
            ]
        return bucket_batches(
            sizes,
            settings.batch_size,
            settings.seed,
            epoch,
            self.context.rank,
            self.context.world_size,
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                for name, value in _scalars(record):
                    self.tensorboard.add_scalar(name, value, record["step"])
                self.tensorboard.flush()

    def _target(self, item: dict[str, Any], image: torch.Tensor) -> torch.Tensor:
        """(C, h, w) teacher map of one view: from the cache, or computed (and cached)."""
        target = item.get("target")
        if target is not None:
            return target.to(self.device, non_blocking=True).float()
        source = f"{item['path']} (view {item['index']}) at step {self.state.step}"
        target = teacher_map(self.teacher, image, self.autocast, source)
        if self.cache is not None and item.get("key") is not None:
            self.cache.save(item["key"], target, item["description"])
        return target

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(MSE of a micro-batch of same-size views, number of views used).

        Unreadable images are recorded and left out; if none is left, a tiny zero-weighted pass
        keeps every DDP rank running the same passes.
        """
        for path, reason in batch["skipped"]:
            warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
            if path not in self.state.skipped_files:
                self.state.skipped_files.append(path)
        if batch["images"] is None:
            size = self.student.patch_size * 2
            blank = torch.zeros(1, 3, size, size, device=self.device)
            with self.autocast():
                return self.model(blank).float().sum() * 0.0, 0
        images = batch["images"].to(self.device, non_blocking=True)
        targets = torch.stack(
            [self._target(item, image) for item, image in zip(batch["items"], images, strict=True)]
        )
        with self.autocast():
            prediction = self.model(images)
        return F.mse_loss(prediction.float(), targets), len(batch["items"])

    def _check_loss(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """Stop before a non-finite loss reaches the optimizer; name the views and the step."""
        paths = ", ".join(item["path"] for item in batch["items"])
        check_finite(loss.detach(), f"the loss at step {self.state.step} (images: {paths})")

    def _optimizer_step(self) -> None:
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1

    # -- held-out evaluation and checkpoints ---------------------------------------------------

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Agreement on every held-out set (rank 0 computes, the others wait)."""
        results = {}
        if self.context.is_main:
            for heldout in self.heldout:
                results[heldout.name] = agreement(self.student, heldout, self.device, self.autocast)
        self.context.barrier()
        return results

    def _record_heldout(self, when: str) -> dict[str, dict[str, float]]:
        results = self.evaluate()
        if self.context.is_main and results:
            record = {"event": "heldout", "when": when, "step": self.state.step, **results}
            self.state.history.append(record)
            self._log(record)
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
            save_checkpoint(self.checkpoint_dir / "last.safetensors", self.student, extra)
            atomic_write_bytes(self.checkpoint_dir / "last.state.pt", self._state_bytes())
            if improved:
                save_checkpoint(self.checkpoint_dir / "best.safetensors", self.student, extra)
        self.context.barrier()

    def _state_bytes(self) -> bytes:
        """Everything :meth:`resume` restores besides the weights, as ``torch.save`` bytes of
        tensors and plain values only, so that ``weights_only=True`` reads them."""
        buffer = io.BytesIO()
        rng = {
            "python": random.getstate(),
            "numpy": self._numpy_rng_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(
            {
                "state": asdict(self.state),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "total_steps": self.total_steps,
            },
            buffer,
        )
        return buffer.getvalue()

    def resume(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, loss scaler, counters and RNGs from a run.

        ``path`` is a run directory, its ``checkpoints/`` directory or a ``.safetensors``
        checkpoint with its ``.state.pt`` beside it.
        """
        weights, state_path = resolve_resume_paths(path)
        load_checkpoint(self.student, weights)
        saved = self._read_state(state_path)
        if saved["total_steps"] != self.total_steps:
            warnings.warn(
                f"resuming a run planned for {saved['total_steps']} steps with "
                f"{self.total_steps}; the learning-rate schedule will differ",
                stacklevel=2,
            )
        known_skipped = self.state.skipped_files
        self.state = TrainingState(**saved["state"])
        self.state.skipped_files = sorted(set(self.state.skipped_files) | set(known_skipped))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        rng = saved["rng"]
        random.setstate(rng["python"])
        self._set_numpy_rng_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    _STATE_KEYS = ("state", "optimizer", "scheduler", "scaler", "rng", "total_steps")

    @classmethod
    def _read_state(cls, path: Path) -> dict[str, Any]:
        """The training state written by :meth:`_state_bytes`, read without running code."""
        saved = read_weight_file(path)
        if not isinstance(saved, dict) or not set(cls._STATE_KEYS) <= set(saved):
            raise WeightLoadingError(
                f"cannot resume: {path} is not a SPAR training state (expected the entries "
                f"{', '.join(cls._STATE_KEYS)})"
            )
        return saved

    @staticmethod
    def _numpy_rng_state() -> dict[str, Any]:
        """``np.random.get_state()`` as a tensor and plain values, for ``weights_only``."""
        kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }

    @staticmethod
    def _set_numpy_rng_state(saved: dict[str, Any]) -> None:
        """Restore numpy's global RNG from :meth:`_numpy_rng_state`'s dict."""
        key = saved["key"].numpy().astype(np.uint32)
        np.random.set_state(
            (saved["kind"], key, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
        )

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train, evaluate, checkpoint; returns (and rank 0 writes) ``train_summary.json``."""
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
        summary = self.summary(seconds, images, stopped_early)
        if self.context.is_main:
            atomic_write_json(self.out_dir / "train_summary.json", summary)
        return summary

    def _run_epoch(self) -> bool:
        """One epoch (or its rest, after a resume); True when ``stop_after_steps`` was hit."""
        settings = self.settings
        self.views.set_epoch(self.state.epoch)
        batches = self.epoch_batches(self.state.epoch)
        remaining = batches[self.state.consumed :]
        loader = DataLoader(
            self.views,
            batch_sampler=remaining,
            num_workers=settings.num_workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self.student.train()
        progress = tqdm(
            loader,
            total=len(remaining),
            desc=f"epoch {self.state.epoch + 1}/{settings.epochs}",
            unit="batch",
            disable=not (settings.show_progress and self.context.is_main),
        )
        window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
        for position, batch in enumerate(progress, start=self.state.consumed):
            last_micro = (position + 1) % settings.accumulate == 0 or position + 1 == len(batches)
            sync = last_micro or not self.context.is_distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss, used = self._loss(batch)
                group_start = position // settings.accumulate * settings.accumulate
                group = min(settings.accumulate, len(batches) - group_start)
                self.scaler.scale(loss / group).backward()
            if used:
                self._check_loss(loss, batch)
                window_loss += loss.item() * used
                window_count += used
                self.state.images_seen += used
            self.state.consumed = position + 1
            if not last_micro:
                continue
            self._optimizer_step()
            if self.state.step % settings.log_every == 0:
                window_loss, window_count, window_start = self._log_train(
                    window_loss, window_count, window_start, progress
                )
            if settings.checkpoint_every and self.state.step % settings.checkpoint_every == 0:
                self.save()
            stop = settings.stop_after_steps
            if stop is not None and self.state.step >= stop:
                self.save()
                progress.close()
                return True
        progress.close()
        return False

    def _log_train(self, loss_sum, count, started, progress):
        loss_sum, count = self.context.all_reduce_sum([loss_sum, count])
        elapsed = time.perf_counter() - started
        record = {
            "event": "train",
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss_sum / max(count, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_second": count / max(elapsed, 1e-9),
        }
        self._log(record)
        progress.set_postfix(
            loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_second']:.2f}"
        )
        return 0.0, 0, time.perf_counter()

    def summary(self, seconds: float, images: int, stopped_early: bool) -> dict[str, Any]:
        """The run's results: held-out agreement before/after, counts, checkpoint paths."""
        history = self.state.history
        before = history[0] if history else {}
        after = history[-1] if history else {}
        first = self.heldout[0].name if self.heldout else None
        best = self.checkpoint_dir / "best.safetensors"
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
            "precision": str(self.dtype).replace("torch.", "") if self.dtype else "float32",
            "run": self.run_info,
        }


def _scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a log record as (``event/name``, value) pairs."""
    prefix = prefix or record.get("event", "log")
    pairs = []
    for name, value in record.items():
        if isinstance(value, dict):
            pairs += _scalars(value, f"{prefix}/{name}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and name != "step":
            pairs.append((f"{prefix}/{name}", float(value)))
    return pairs


def resolve_resume_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, training state) files of a run directory, checkpoint directory or file."""
    path = Path(path)
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = directory / "last.safetensors"
    if path.name.endswith(".state.pt"):
        path = path.with_name(path.name[: -len(".state.pt")] + ".safetensors")
    state = path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")
    for required in (path, state):
        if not required.is_file():
            raise FileNotFoundError(
                f"cannot resume: {required} not found (resume= takes a run directory, its "
                "checkpoints/ directory or a last.safetensors with last.state.pt beside it)"
            )
    return path, state
