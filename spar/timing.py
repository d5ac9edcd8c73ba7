"""Synchronised wall-clock timing of a call, for the notebook, the tools (``spar.tools``), the
evaluation loop and the compile report: the one place spar waits for a device to time it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    function: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5
) -> dict[str, float]:
    """Median, min and max seconds of ``function()`` after ``warmup`` calls, synchronised."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def timed_call(function: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(``function()``, its seconds): one call, no warm-up, timed by :func:`time_call` (so
    synchronised on ``device`` before and after)."""
    result = {}
    seconds = time_call(lambda: result.update(value=function()), device, warmup=0, repeats=1)
    return result["value"], seconds["median_s"]
