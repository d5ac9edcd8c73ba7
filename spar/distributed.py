"""torch.distributed set-up for torchrun: one process per device, NCCL on GPU, gloo on CPU."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .utils import pass_through, resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all ranks (identity when not distributed)."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._reduce_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def union(self, items: list[str]) -> list[str]:
        """Sorted union of string lists over all ranks."""
        if not self.is_distributed:
            return sorted(set(items))
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, list(items))
        return sorted({item for part in gathered for item in part or []})

    def shard_loader(
        self, dataset: Dataset, num_workers: int = 0, pin_memory: bool = False
    ) -> DataLoader:
        """This rank's share of ``dataset``: items ``rank, rank + W, ...``, one at a time as they
        are (no batching, no collation), loaded by ``num_workers`` processes."""
        shard = list(range(self.rank, len(dataset), self.world_size))
        return DataLoader(
            Subset(dataset, shard),
            batch_size=None,
            num_workers=num_workers,
            collate_fn=pass_through,
            pin_memory=pin_memory,
        )

    def progress(self, iterable: Iterable, show: bool = True, **options: Any) -> tqdm:
        """A tqdm bar over ``iterable``, drawn by rank 0 only (and only when ``show``)."""
        return tqdm(iterable, disable=not (show and self.is_main), **options)

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: str = "auto", timeout_minutes: float = 180) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE`` > 1 this is a single process on ``resolve_device(device)``. Under
    torchrun each process takes ``cuda:LOCAL_RANK`` when CUDA is used (backend NCCL), or the CPU
    (backend gloo). ``timeout_minutes`` bounds collective waits; it is generous because ranks may
    wait at a barrier while others fill the teacher cache.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return DistributedContext(rank, world_size, local_rank, chosen)


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """Wrap a script's work: leave the process group when it ends.

    On success every rank first waits for the others (so no rank tears the group down while a
    peer still finishes its last collective); after an error it leaves at once, since the
    peers may never reach a barrier.
    """
    try:
        yield
    except BaseException:
        shutdown_distributed()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    shutdown_distributed()


def shutdown_distributed() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_id() -> str:
    """A name for this run's output directory, unique per run, that every torchrun rank agrees on.

    A single process: the time to the second plus 6 random hex digits (two runs started in the
    same second get different folders). Under torchrun: the date plus the rendezvous run id,
    which is the same on every rank (a timestamp could differ by a second between ranks and
    split the outputs); a rendezvous id reused on the same day gives the same name, and the
    training run then refuses the folder (``spar.distill.run_log.RunFolder``) rather than mix two
    runs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        return f"{time.strftime('%Y-%m-%d')}_torchrun-{os.environ['TORCHELASTIC_RUN_ID'][:8]}"
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def register_run_id_resolver() -> None:
    """Make ``${spar_run_id:}`` available to Hydra configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("spar_run_id"):
        OmegaConf.register_new_resolver("spar_run_id", run_id, use_cache=True)


def is_main_process() -> bool:
    """True on rank 0 of a torchrun job and in a single process."""
    return int(os.environ.get("RANK", "0")) == 0
