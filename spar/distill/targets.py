"""Teacher maps of training and held-out views: the one owner of their keys, cache and computation.

:class:`TeacherTargets` keys every view (teacher identity, image file, view description), reads
and writes the :class:`~spar.distill.cache.TeacherFeatureCache` (when there is one), runs the
teacher on a miss and fills the cache for a whole dataset of views. The training views, the
trainer and the held-out sets all go through it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..distributed import DistributedContext
from ..models.base import patch_grid
from ..utils import Autocast, check_finite, module_device
from .cache import TeacherFeatureCache, entry_key, image_identity, teacher_identity

if TYPE_CHECKING:
    from .data import DistillationViews


@torch.no_grad()
def teacher_map(
    teacher: nn.Module,
    image: torch.Tensor,
    autocast: Autocast = contextlib.nullcontext,
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


@dataclass(frozen=True)
class TargetKey:
    """The cache entry of one view: ``name`` (SHA-256 hex) and the JSON ``description`` it hashes
    (``teacher``, ``image`` and ``view`` parts), stored with the entry."""

    name: str
    description: dict[str, Any]


class TeacherTargets:
    """Teacher maps of views: keyed, read from the cache, computed on a miss and written back.

    Args:
        teacher: the frozen sliding-window teacher, on the device it runs on.
        root: the data root; image files are keyed by their path relative to it.
        cache: where maps are stored (``None``: computed every time, nothing stored).
        autocast: autocast factory for the teacher (``spar.utils.autocast_for``).
        name: human-readable backbone name stored in the keys (information only).

    Pickled (into data-loading worker processes, with the views it keys) it keeps its keys and
    cache reads only: the teacher and the autocast factory stay behind.
    """

    def __init__(
        self,
        teacher: nn.Module,
        root: str | Path,
        *,
        cache: TeacherFeatureCache | None = None,
        autocast: Autocast = contextlib.nullcontext,
        name: str | None = None,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.root = Path(root)
        self.cache = cache
        self.autocast = autocast
        self.identity = teacher_identity(teacher, name)

    def __getstate__(self) -> dict[str, Any]:
        # Data-loading workers only key views and read entries: the teacher (possibly on a GPU)
        # and the autocast factory (a closure) stay in the main process.
        return {**self.__dict__, "teacher": None, "autocast": None}

    def key_for(self, image_path: str | Path, view: dict[str, Any]) -> TargetKey:
        """The key of ``view`` (e.g. ``{"augmentation": plan}``) of the file ``image_path``."""
        description = {
            "teacher": self.identity,
            "image": image_identity(image_path, self.root),
            "view": view,
        }
        return TargetKey(entry_key(self.identity, description["image"], view), description)

    def shape_for(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the map of a view of (H, W) pixels."""
        return (self.identity["embed_dim"], *patch_grid(*size, self.identity["patch_size"]))

    def load(self, key: TargetKey, size: tuple[int, int]) -> torch.Tensor | None:
        """The stored (C, h, w) float16 map of a view of (H, W) ``size``, on the CPU; ``None``
        without a cache, or when the entry is missing or bad (bad ones are reported)."""
        if self.cache is None:
            return None
        return self.cache.load(key.name, self.shape_for(size))

    def compute(self, image: torch.Tensor, key: TargetKey | None, source: str) -> torch.Tensor:
        """Run the teacher on a (3, H, W) view and store the map under ``key`` (if a cache and a
        key are given). Returns the (C, h, w) float32 map on the teacher's device; when stored, its
        values are those of the stored float16 map, so a recomputed entry trains bitwise like a
        stored one.

        Raises:
            NonFiniteError: the map holds NaN or inf (naming ``source``); nothing is stored.
        """
        image = image.to(module_device(self.teacher), non_blocking=True)
        target = teacher_map(self.teacher, image, self.autocast, source)
        if self.cache is not None and key is not None:
            self.cache.save(key.name, target, key.description)
            # Exactly the stored values: a recomputed entry trains as a stored one would.
            target = target.half().float()
        return target

    def get_or_compute(self, image: torch.Tensor, key: TargetKey, source: str) -> torch.Tensor:
        """The (C, h, w) map of a (3, H, W) view: the stored one (float16, CPU) if present and
        sound, else computed and stored (float32, teacher's device)."""
        target = self.load(key, tuple(image.shape[-2:]))
        return target if target is not None else self.compute(image, key, source)

    def fill(
        self,
        views: DistillationViews,
        context: DistributedContext,
        *,
        num_workers: int = 0,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        """Compute every missing or bad cache entry of ``views``; rank r takes views r, r+W, ...

        Entries already present with a sound header are kept, so an interrupted run resumes
        where it stopped; a bad header (truncated, flipped, mis-keyed, mis-shaped) is reported
        with a warning naming the file and recomputed. Data bytes are verified against the
        entry's checksum on every read (training step, held-out set), which reports and
        recomputes a damaged entry then. Returns counts summed over ranks: ``computed``, ``reused``,
        ``skipped`` (images that could not be decoded) and the skipped files of this rank.
        """
        if self.cache is None:
            raise ValueError("these teacher targets have no cache to fill")
        if views.targets is not self:
            raise ValueError(
                "the views must be keyed by these targets (DistillationViews(targets=))"
            )
        loader = context.shard_loader(views.without_targets(), num_workers)
        progress = context.progress(loader, show_progress, desc="teacher cache", unit="view")
        counts = {"computed": 0, "reused": 0, "skipped": 0}
        skipped_files = []
        for item in progress:
            if item["skipped"] is not None:
                counts["skipped"] += 1
                skipped_files.append(item["path"])
            elif self.cache.has(item["key"].name, self.shape_for(item["plan"].output), warn=True):
                counts["reused"] += 1
            else:
                self.compute(item["image"], item["key"], source=item["path"])
                counts["computed"] += 1
        totals = context.all_reduce_sum([counts["computed"], counts["reused"], counts["skipped"]])
        context.barrier()
        return {
            "computed": int(totals[0]),
            "reused": int(totals[1]),
            "skipped": int(totals[2]),
            "skipped_files": skipped_files,
        }
