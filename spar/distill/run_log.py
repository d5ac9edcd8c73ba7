"""The training log: ``metrics.jsonl`` records and, optionally, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLog:
    """Appends records to ``out_dir/metrics.jsonl`` (one JSON object per line) and, with
    ``tensorboard``, their numeric leaves as TensorBoard scalars in ``out_dir/tb``.

    Only the process with ``enabled`` (rank 0) writes; the others ignore every record.

    Raises:
        ImportError: ``tensorboard`` is asked for but the package is not installed.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / "metrics.jsonl"
        self.tensorboard = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "trainer.tensorboard=true needs: pip install tensorboard"
                ) from error
            self.tensorboard = SummaryWriter(str(self.out_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        """Log ``record``, a dict with ``event`` and ``step`` and (nested) values."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for name, value in scalars(record):
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()


def scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a log record as (``event/name``, value) pairs."""
    prefix = prefix or record.get("event", "log")
    pairs = []
    for name, value in record.items():
        if isinstance(value, dict):
            pairs += scalars(value, f"{prefix}/{name}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and name != "step":
            pairs.append((f"{prefix}/{name}", float(value)))
    return pairs
