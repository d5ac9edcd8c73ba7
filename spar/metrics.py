"""Semantic-segmentation scores from an accumulated confusion matrix.

All scores are fractions in [0, 1] (multiply by 100 for the percentages papers report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of a confusion matrix, as fractions in [0, 1].

    Attributes:
        miou: mean IoU over the classes present in prediction or target (union > 0); NaN when
            no pixel was counted.
        per_class_iou: (K,) float64, NaN for classes absent from both prediction and target.
        aacc: overall pixel accuracy (correct / counted pixels).
        macc: mean per-class accuracy (recall) over the classes present in the target.
        confusion: (K, K) int64 copy, rows = target class, columns = predicted class.
    """

    miou: float
    per_class_iou: torch.Tensor
    aacc: float
    macc: float
    confusion: torch.Tensor


def _flat_long(values: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Any-shape integer tensor or array -> flat (numel,) int64 CPU tensor."""
    tensor = torch.as_tensor(values)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {tensor.dtype}")
    return tensor.detach().to("cpu", torch.long).flatten()


class MeanIoU:
    """Accumulates a (K, K) confusion matrix over a split; reports mIoU, per-class IoU, accuracy.

    The matrix lives on the CPU as int64, rows = target class, columns = predicted class.
    Shards (data-parallel workers) combine with :meth:`merge`, or by all-reducing
    :attr:`confusion` in place.

    Args:
        num_classes: K; predictions and non-ignored targets must lie in [0, K).
        ignore_index: target value whose pixels are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    @property
    def confusion(self) -> torch.Tensor:
        """(K, K) int64 accumulator itself, not a copy: in-place ops (all-reduce) update it."""
        return self._confusion

    def reset(self) -> None:
        """Zero the accumulated counts."""
        self._confusion.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Count one batch.

        Args:
            pred: integer class indices of any shape, e.g. (H, W) or (B, H, W); every value in
                [0, K), ignored pixels included.
            target: integer labels of the same shape; values in [0, K) or ``ignore_index``.

        Raises:
            ValueError: shapes differ, a value is out of range, or the inputs are not integers.
        """
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from "
                f"target shape {tuple(target.shape)}"
            )
        pred = _flat_long(pred, "prediction")
        target = _flat_long(target, "target")
        self._check_range(pred, "prediction")
        counted = target != self.ignore_index
        pred, target = pred[counted], target[counted]
        self._check_range(target, "target")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self._confusion += counts.view(self.num_classes, self.num_classes)

    def _check_range(self, values: torch.Tensor, name: str) -> None:
        """Raise ``ValueError`` naming (up to 10 of) the values of ``values`` outside [0, K)."""
        bad = (values < 0) | (values >= self.num_classes)
        if bad.any():
            shown = values[bad].unique()[:10].tolist()
            raise ValueError(
                f"{name} values {shown} outside [0, {self.num_classes}) "
                f"(ignore_index={self.ignore_index})"
            )

    def merge(self, other: MeanIoU) -> MeanIoU:
        """Add another shard's confusion matrix into this one (same K); returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._confusion += other.confusion
        return self

    def compute(self) -> SegmentationScores:
        """Scores of everything counted so far (see :class:`SegmentationScores`)."""
        confusion = self._confusion.double()
        true_positive = confusion.diag()
        target_total = confusion.sum(1)
        union = target_total + confusion.sum(0) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp_min(1), torch.nan)
        accuracy = torch.where(
            target_total > 0, true_positive / target_total.clamp_min(1), torch.nan
        )
        counted = target_total.sum()
        return SegmentationScores(
            miou=float(iou.nanmean()),
            per_class_iou=iou,
            aacc=float(true_positive.sum() / counted) if counted > 0 else float("nan"),
            macc=float(accuracy.nanmean()),
            confusion=self._confusion.clone(),
        )
