"""A training loop with hooks, built the way detectron2's ``engine/train_loop.py`` is.

:class:`TrainLoop` runs epochs of optimizer steps and calls its hooks around them;
:class:`HookBase` is what a hook overrides. The loop knows nothing of checkpoints, logs,
held-out checks or stopping rules: those are hooks (``spar.distill.hooks``), and a user adds
their own with :meth:`TrainLoop.register_hooks`.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any


class HookBase:
    """A hook of :class:`TrainLoop`: override the events it handles; the others do nothing.

    Call order::

        before_train
        for every epoch left:
            before_epoch
            for every optimizer step of the epoch:  before_step, (the step), after_step
            after_epoch            (not reached when a stop is requested inside the epoch)
        after_train                (not called when a step raises)

    ``self.trainer`` is the loop (a weak proxy, set by :meth:`TrainLoop.register_hooks`): a
    hook reads its counters (``trainer.state.step``, ``trainer.step_loss`` for the
    ``Distiller``) and may call ``trainer.request_stop()``. Under torchrun every rank runs every
    hook: a stop must be requested by all ranks at the same event, so decide it from values the
    ranks share (e.g. ``trainer.context.all_reduce_sum``), not from one rank's loss.
    """

    trainer: Any = None

    def before_train(self) -> None:
        """Once, before the first epoch (after a resume has restored the counters)."""

    def after_train(self) -> None:
        """Once, after the last epoch or after a requested stop."""

    def before_epoch(self) -> None:
        """Before the first step of every epoch (also of an epoch a resumed run finishes)."""

    def after_epoch(self) -> None:
        """After the last step of every epoch, once the epoch counter has advanced."""

    def before_step(self) -> None:
        """Before the first micro-batch of every optimizer step."""

    def after_step(self) -> None:
        """After every optimizer step (the step counter has advanced)."""


class TrainLoop(ABC):
    """Epochs of optimizer steps with hooks called around them (detectron2's ``TrainerBase``).

    A subclass says what an epoch and a step are: :meth:`epochs_left`, :meth:`epoch_steps` (a
    context manager giving the epoch's steps, each an iterable of micro-batches),
    :meth:`run_step` and :meth:`finish_epoch`.
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.stop_requested = False
        self.train_seconds = 0.0

    @property
    def hooks(self) -> tuple[HookBase, ...]:
        """The registered hooks, in the order they are called."""
        return tuple(self._hooks)

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        """Append ``hooks`` (``None`` entries are skipped); they run after those already there."""
        for hook in hooks:
            if hook is None:
                continue
            if not isinstance(hook, HookBase):
                raise TypeError(f"a hook must subclass spar.distill.HookBase, got {hook!r}")
            hook.trainer = weakref.proxy(self)  # no reference cycle between loop and hook
            self._hooks.append(hook)

    def request_stop(self) -> None:
        """End the run after the current event (a hook's way to stop, e.g. early stopping)."""
        self.stop_requested = True

    def call_hooks(self, event: str) -> None:
        for hook in self._hooks:
            getattr(hook, event)()

    def train(self) -> bool:
        """Run the epochs left, calling the hooks; True when a hook requested a stop."""
        self.stop_requested = False
        self.call_hooks("before_train")
        started = time.perf_counter()
        while not self.stop_requested and self.epochs_left():
            self.call_hooks("before_epoch")
            with self.epoch_steps() as steps:
                for micro_batches in steps:
                    if self.stop_requested:
                        break
                    self.call_hooks("before_step")
                    self.run_step(micro_batches)
                    self.call_hooks("after_step")
            if self.stop_requested:
                break
            self.finish_epoch()
            self.call_hooks("after_epoch")
        self.call_hooks("after_train")
        self.train_seconds = time.perf_counter() - started
        return self.stop_requested

    @abstractmethod
    def epochs_left(self) -> bool:
        """Whether an epoch (or the rest of one) remains."""

    @abstractmethod
    def epoch_steps(self) -> contextlib.AbstractContextManager[Iterable[Iterable[Any]]]:
        """A context manager giving the current epoch's optimizer steps, each an iterable of
        its micro-batches; leaving it releases the epoch's resources (loader, progress bar)."""

    @abstractmethod
    def run_step(self, micro_batches: Iterable[Any]) -> None:
        """Train on the micro-batches of one optimizer step and make the step."""

    @abstractmethod
    def finish_epoch(self) -> None:
        """Advance the epoch counter after the epoch's last step."""


def accumulation_groups(
    batches: Iterator[tuple[int, Any]], start: int, total: int, accumulate: int
) -> Iterator[Iterator[tuple[int, Any]]]:
    """Split the (position, micro-batch) pairs from position ``start`` to ``total`` into the
    groups of one optimizer step each: positions ``[k * accumulate, (k + 1) * accumulate)``,
    the last group shorter. Groups are read lazily from ``batches``, in order."""
    position = start
    while position < total:
        end = min((position // accumulate + 1) * accumulate, total)
        yield itertools.islice(batches, end - position)
        position = end
