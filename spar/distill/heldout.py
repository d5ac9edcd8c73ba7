"""Held-out agreement: how close the student's single pass is to the teacher on unseen images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import patch_grid
from .cache import TeacherFeatureCache, entry_key, image_identity
from .data import heldout_view
from .targets import Autocast, no_autocast, teacher_map


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
    paths: Sequence[Path],
    sizes: Sequence[Sequence[int]],
    teacher: nn.Module,
    device: torch.device,
    *,
    autocast: Autocast = no_autocast,
    cache: TeacherFeatureCache | None = None,
    teacher_identity: dict | None = None,
    root: str | Path | None = None,
) -> tuple[list[HeldoutSet], list[str]]:
    """Teacher maps of every held-out image at every size (from the cache when given).

    Returns the sets and the files that could not be decoded.
    """
    sets, unreadable = [], []
    mean, std = teacher.mean, teacher.std
    for size in sizes:
        bounds = (int(max(size)), int(min(size)))
        heldout = HeldoutSet(f"{bounds[0]}x{bounds[1]}", bounds, [], [])
        for path in paths:
            try:
                view = heldout_view(path, bounds, mean, std)
            except (ValueError, OSError):
                if str(path) not in unreadable:
                    unreadable.append(str(path))
                continue
            target = None
            if cache is not None:
                teacher_part = teacher_identity
                image_part = image_identity(path, root or Path(path).parent)
                view_part = {"resize_to_fit": list(bounds)}
                key = entry_key(teacher_part, image_part, view_part)
                shape = (teacher.embed_dim, *patch_grid(*view.shape[-2:], teacher.patch_size))
                target = cache.load(key, shape)
            if target is None:
                source = f"held-out image {path} at {heldout.name}"
                target = teacher_map(teacher, view[0].to(device), autocast, source)
                target = target.half().cpu()
                if cache is not None:
                    description = {"teacher": teacher_part, "image": image_part, "view": view_part}
                    cache.save(key, target, description)
            heldout.paths.append(Path(path))
            heldout.targets.append(target)
        sets.append(heldout)
    return sets, unreadable


@torch.no_grad()
def agreement(
    student: nn.Module,
    heldout: HeldoutSet,
    device: torch.device,
    autocast: Autocast = no_autocast,
) -> dict[str, float]:
    """Mean over images of the student-teacher MSE and of the per-cell cosine similarity."""
    was_training = student.training
    student.eval()
    mse, cosine = [], []
    for path, target in zip(heldout.paths, heldout.targets, strict=True):
        view = heldout_view(path, heldout.bounds, student.mean, student.std).to(device)
        with autocast():
            prediction = student(view)[0].float()
        target = target.to(device).float()
        mse.append(F.mse_loss(prediction, target).item())
        cosine.append(F.cosine_similarity(prediction, target, dim=0).mean().item())
    student.train(was_training)
    count = max(len(mse), 1)
    return {"mse": sum(mse) / count, "cos": sum(cosine) / count, "images": len(mse)}
