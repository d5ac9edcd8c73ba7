"""Held-out agreement: how close the student's single pass is to the teacher on unseen images."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import prepare_image
from ..utils import Autocast
from .targets import TeacherTargets


@dataclass
class HeldoutSet:
    """Held-out images at one resolution, with their (C, h, w) float16 teacher maps.

    Attributes:
        name: label such as ``"448x336"`` (the (long, short) bound).
        bounds: (long, short) side bound the images are resized to fit.
        paths: image files (undecodable ones are left out when the set is built).
        targets: teacher maps, one per path, on the CPU.
    """

    name: str
    bounds: tuple[int, int]
    paths: list[Path]
    targets: list[torch.Tensor]


def build_heldout_sets(
    paths: Sequence[Path], sizes: Sequence[Sequence[int]], targets: TeacherTargets
) -> tuple[list[HeldoutSet], list[str]]:
    """Teacher maps of every held-out image at every (long, short) size in ``sizes``, through
    ``targets`` (from its cache when stored there, computed and stored otherwise).

    Returns the sets and the files that could not be decoded.
    """
    sets, unreadable = [], []
    mean, std = targets.teacher.mean, targets.teacher.std
    for size in sizes:
        bounds = (int(max(size)), int(min(size)))
        heldout = HeldoutSet(f"{bounds[0]}x{bounds[1]}", bounds, [], [])
        for path in paths:
            try:
                view = prepare_image(path, bounds, mean, std)[1][0]
            except (ValueError, OSError):
                if str(path) not in unreadable:
                    unreadable.append(str(path))
                continue
            key = targets.key_for(path, {"resize_to_fit": list(bounds)})
            source = f"held-out image {path} at {heldout.name}"
            heldout.paths.append(Path(path))
            heldout.targets.append(targets.get_or_compute(view, key, source).half().cpu())
        sets.append(heldout)
    return sets, unreadable


@torch.no_grad()
def agreement(
    student: nn.Module,
    heldout: HeldoutSet,
    device: torch.device,
    autocast: Autocast = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean over images of the student-teacher MSE and of the per-cell cosine similarity."""
    was_training = student.training
    student.eval()
    mse, cosine = [], []
    for path, target in zip(heldout.paths, heldout.targets, strict=True):
        _, view = prepare_image(path, heldout.bounds, student.mean, student.std, device)
        with autocast():
            prediction = student(view)[0].float()
        target = target.to(device).float()
        mse.append(F.mse_loss(prediction, target).item())
        cosine.append(F.cosine_similarity(prediction, target, dim=0).mean().item())
    student.train(was_training)
    count = max(len(mse), 1)
    return {"mse": sum(mse) / count, "cos": sum(cosine) / count, "images": len(mse)}
