"""Teacher maps for training views: computed in the step (online) or filled into the cache."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..distributed import DistributedContext
from ..utils import check_finite, pass_through
from .cache import TeacherFeatureCache
from .data import DistillationViews

Autocast = Callable[[], contextlib.AbstractContextManager]


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_map(
    teacher: nn.Module,
    image: torch.Tensor,
    autocast: Autocast = no_autocast,
    source: str = "an image",
) -> torch.Tensor:
    """(3, H, W) normalised view on the teacher's device -> (C, h, w) float32 stitched map.

    Raises:
        NonFiniteError: the map holds NaN or inf; the message names ``source`` (the image, and
            the step where there is one).
    """
    with autocast():
        stitched = teacher(image[None])[0].float()
    return check_finite(stitched, f"the teacher map of {source}")


def fill_teacher_cache(
    teacher: nn.Module,
    views: DistillationViews,
    cache: TeacherFeatureCache,
    context: DistributedContext,
    autocast: Autocast = no_autocast,
    num_workers: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Compute every missing or bad cache entry of ``views``; rank r takes views r, r+W, ...

    Entries already present and well-formed (header check) are kept, so an interrupted run
    resumes where it stopped. Returns counts summed over ranks: ``computed``, ``reused``,
    ``skipped`` (images that could not be decoded) and the skipped files of this rank.
    """
    if views.cache is not cache:
        raise ValueError("the views must be keyed for this cache (DistillationViews(cache=...))")
    shard = list(range(context.rank, len(views), context.world_size))
    previous = views.load_targets
    views.load_targets = False
    counts = {"computed": 0, "reused": 0, "skipped": 0}
    skipped_files = []
    loader = DataLoader(
        Subset(views, shard),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=pass_through,
    )
    try:
        progress = tqdm(
            loader,
            total=len(shard),
            desc="teacher cache",
            unit="view",
            disable=not (show_progress and context.is_main),
        )
        for item in progress:
            if item["skipped"] is not None:
                counts["skipped"] += 1
                skipped_files.append(item["path"])
                continue
            if cache.has(item["key"], views.target_shape(item["plan"])):
                counts["reused"] += 1
                continue
            image = item["image"].to(context.device, non_blocking=True)
            target = teacher_map(teacher, image, autocast, source=item["path"])
            cache.save(item["key"], target, item["description"])
            counts["computed"] += 1
    finally:
        views.load_targets = previous
    totals = context.all_reduce_sum([counts["computed"], counts["reused"], counts["skipped"]])
    context.barrier()
    return {
        "computed": int(totals[0]),
        "reused": int(totals[1]),
        "skipped": int(totals[2]),
        "skipped_files": skipped_files,
    }
