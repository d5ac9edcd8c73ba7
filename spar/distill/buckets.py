"""Batches of same-size views (size buckets), so that variable-size training can use batches > 1.

Views of one batch must have the same size to be stacked. Views are grouped by their planned
output size, shuffled within each size, cut into batches of at most ``batch_size``, and the
batches shuffled; with a coarser ``size_multiple`` in the augmentation recipe more views share a
size. Under torchrun the batch list is padded to a multiple of the ranks and dealt out.
:class:`SizeBucketBatchSampler` hands these batches to a ``DataLoader`` one epoch at a time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from ..deprecations import module_getattr
from ..imaging import image_size as _header_size  # not `image_size`: its old name here

if TYPE_CHECKING:
    from .data import DistillationViews


def image_size_or_none(path: str | Path) -> tuple[int, int] | None:
    """(H, W) from the file header without decoding the pixels (:func:`spar.imaging.image_size`),
    or ``None`` where that raises: a missing, unreadable or too large image is reported when its
    view is loaded, and meanwhile sits in a batch of its own."""
    try:
        return _header_size(path)
    except Exception:  # noqa: BLE001 - reported, with its reason, when the view is loaded
        return None


#: ``spar.distill.buckets.image_size`` (renamed): an ImportError naming the new spelling.
__getattr__ = module_getattr(__name__)


def epoch_order(
    num_views: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """This rank's views for ``epoch``: a seeded permutation, padded to a multiple of the ranks."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_views, generator=generator).tolist()
    padded = math.ceil(num_views / world_size) * world_size
    order += order[: padded - num_views]
    return order[rank::world_size]


def bucket_batches(
    sizes: Sequence[tuple[int, int] | None],
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """This rank's batches of view indices for ``epoch``; every batch holds one size.

    Args:
        sizes: output (H, W) of every view (``None``: unknown, e.g. unreadable, kept alone).
        batch_size: at most this many views per batch (1: the plain permutation).
    """
    if batch_size == 1:
        return [[index] for index in epoch_order(len(sizes), seed, epoch, rank, world_size)]
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    buckets: dict[object, list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        buckets[size if size is not None else ("alone", index)].append(index)
    batches = []
    for key in sorted(buckets, key=str):
        members = buckets[key]
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    padded = math.ceil(len(batches) / world_size) * world_size
    batches += batches[: padded - len(batches)]
    return batches[rank::world_size]


class SizeBucketBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of view indices for one epoch, a ``DataLoader`` batch sampler.

    The batches of an epoch are :func:`bucket_batches` of the views' planned sizes (read from
    the image headers once, and only when ``batch_size`` > 1). ``set_epoch(epoch, start)``
    selects the epoch and skips its first ``start`` batches, which a resumed run has already
    taken.
    """

    def __init__(
        self,
        views: DistillationViews,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.views = views
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self._source_sizes: list[tuple[int, int] | None] | None = None
        self._epoch_batches: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` for this rank (the last epoch asked for is remembered)."""
        if self._epoch_batches is not None and self._epoch_batches[0] == epoch:
            return self._epoch_batches[1]
        sizes: list[tuple[int, int] | None] = [None] * len(self.views)
        if self.batch_size > 1:
            if self._source_sizes is None:
                self._source_sizes = [image_size_or_none(path) for path in self.views.paths]
            sizes = [
                self.views.view_size(index, self._source_sizes, epoch)
                for index in range(len(self.views))
            ]
        batches = bucket_batches(
            sizes, self.batch_size, self.seed, epoch, self.rank, self.world_size
        )
        self._epoch_batches = (epoch, batches)
        return batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch)[self.start :])

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start
