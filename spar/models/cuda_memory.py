"""CUDA memory for the teacher's window batches: what a card can still give, what a call peaks
at, and how many windows fit (:func:`window_batch_size`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FREE_MEMORY_FRACTION = 0.8  # of the free CUDA memory that window batches may take


def window_batch_size(
    cap: int, free_bytes: int, bytes_per_window: int, fraction: float = FREE_MEMORY_FRACTION
) -> int:
    """Windows per forward: ``min(cap, fraction * free_bytes // bytes_per_window)``, at least 1.

    The teacher's rule on CUDA, where ``free_bytes`` is what the card can still give and
    ``bytes_per_window`` the measured peak of one window (gather, forward, upsampling, scatter);
    ``fraction`` leaves room for fragmentation and for whatever else runs. On CPU the cap is used.
    """
    fits = int(free_bytes * fraction) // max(bytes_per_window, 1)
    return max(1, min(cap, fits))


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes a CUDA ``device`` can still allocate: free on the card plus what torch's caching
    allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def cuda_peak_bytes(function: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA bytes that ``function()`` allocates on top of what was allocated before it.

    Resets the device's peak statistics (``torch.cuda.max_memory_allocated``). The allocator
    counts on the host, when work is queued, so no synchronisation is needed.
    """
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    return torch.cuda.max_memory_allocated(device) - before
