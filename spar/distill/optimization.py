"""The student's update: autocast forward, MSE against the teacher maps, backward, AdamW step.

:class:`StudentOptimizer` is the training step of :class:`~spar.distill.trainer.Distiller`, and
the one the speed benchmark (``spar.speed``) times.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..utils import autocast_dtype, autocast_for, check_finite
from .settings import OptimSettings


def learning_rate_factor(step: int, total: int, settings: OptimSettings) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` of ``total``."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "cosine":
        progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class StudentOptimizer:
    """AdamW on the student's trainable parameters, with its learning-rate schedule, gradient
    clipping, autocast and (fp16 on CUDA) loss scaling.

    Args:
        student: the dense backbone, its parameters to train set to ``requires_grad``.
        settings: see :class:`OptimSettings`.
        device: where the student runs.
        total_steps: optimizer steps the schedule spans.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (``spar.utils.autocast_for``).
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        model: what runs the forward pass, e.g. ``student`` wrapped in DDP (default: student).
    """

    def __init__(
        self,
        student: nn.Module,
        settings: OptimSettings,
        *,
        device: torch.device,
        total_steps: int,
        precision: str = "auto",
        grad_clip: float | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.student = student
        self.model = model if model is not None else student
        self.device = device
        self.parameters = [p for p in student.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError(
                "the student has no trainable parameters: create it with "
                "create_backbone(..., trainable_blocks='last-2') (the paper's; the default 'none' "
                "is for inference) or call student.set_trainable_blocks('last-2')"
            )
        self.total_steps = total_steps
        self.grad_clip = grad_clip
        self.dtype = autocast_dtype(precision, device)
        self.autocast = autocast_for(precision, device)
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=settings.betas,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, total_steps, settings)
        )
        use_scaler = self.dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Float32 MSE between the student's maps of (n, 3, H, W) ``images`` (autocast) and the
        (n, C, h, w) ``targets``."""
        with self.autocast():
            prediction = self.model(images)
        return F.mse_loss(prediction.float(), targets)

    def train_step(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        accumulated: int = 1,
        update: bool = True,
        what: str = "the loss",
    ) -> torch.Tensor:
        """Forward, MSE, backward of ``loss / accumulated``; the optimizer step when ``update``
        (the last micro-batch of an accumulation group). Returns the detached loss.

        Raises:
            NonFiniteError: the loss is NaN or inf (named ``what``), before the optimizer step.
        """
        with self._gradient_sync(update):
            loss = self.loss(images, targets)
            self.scaler.scale(loss / accumulated).backward()
        check_finite(loss.detach(), what)
        if update:
            self._step()
        return loss.detach()

    def idle_step(self, *, accumulated: int = 1, update: bool = True) -> None:
        """A zero-weighted pass on a blank image, for a micro-batch without usable views, so that
        every DDP rank runs the same passes and optimizer steps."""
        size = self.student.patch_size * 2
        blank = torch.zeros(1, 3, size, size, device=self.device)
        with self._gradient_sync(update):
            with self.autocast():
                loss = self.model(blank).float().sum() * 0.0
            self.scaler.scale(loss / accumulated).backward()
        if update:
            self._step()

    def _gradient_sync(self, update: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients only in the pass that ends an accumulation group."""
        if update or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _step(self) -> None:
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and loss-scaler states (tensors and plain values)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
