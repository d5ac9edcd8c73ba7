"""Batches of same-size views (size buckets), so that variable-size training can use batches > 1.

Views of one batch must have the same size to be stacked. Views are grouped by their planned
output size, shuffled within each size, cut into batches of at most ``batch_size``, and the
batches shuffled; with a coarser ``size_multiple`` in the augmentation recipe more views share a
size. Under torchrun the batch list is padded to a multiple of the ranks and dealt out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(H, W) from the file header without decoding the pixels; ``None`` if unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - unreadable images are reported when the view is loaded
        return None
    return height, width


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
