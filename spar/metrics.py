"""Semantic-segmentation scores from an accumulated confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SegmentationScores:
    """Scores as fractions in [0, 1].

    Attributes:
        miou: mean IoU over the classes present in prediction or target (union > 0).
        per_class_iou: (K,) float64, NaN for classes absent from both prediction and target.
        aacc: overall pixel accuracy (correct / labelled pixels).
        macc: mean per-class accuracy over classes present in the target.
        confusion: (K, K) int64, rows = target class, columns = predicted class.
    """

    miou: float
    per_class_iou: torch.Tensor
    aacc: float
    macc: float
    confusion: torch.Tensor


def _as_long_tensor(values: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {tensor.dtype}")
    return tensor.detach().to("cpu", torch.long).flatten()


class MeanIoU:
    """Accumulates a confusion matrix over a split and reports mIoU, per-class IoU, accuracy.

    Args:
        num_classes: K; predictions and (non-ignored) labels must lie in [0, K).
        ignore_index: label value whose pixels are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch: ``pred`` and ``target`` are integer arrays of the same shape."""
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from "
                f"target shape {tuple(target.shape)}"
            )
        pred = _as_long_tensor(pred, "prediction")
        target = _as_long_tensor(target, "target")
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        for values, name in ((target, "target"), (pred, "prediction")):
            bad = (values < 0) | (values >= self.num_classes)
            if bad.any():
                shown = sorted(set(values[bad].unique().tolist()))[:10]
                raise ValueError(
                    f"{name} values {shown} outside [0, {self.num_classes}) "
                    f"(ignore_index={self.ignore_index})"
                )
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def merge(self, other: MeanIoU) -> MeanIoU:
        """Add another shard's confusion matrix into this one (same classes); returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.confusion += other.confusion
        return self

    def compute(self) -> SegmentationScores:
        confusion = self.confusion.double()
        true_positive = confusion.diag()
        target_total = confusion.sum(1)
        union = target_total + confusion.sum(0) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp_min(1), torch.nan)
        accuracy = torch.where(
            target_total > 0, true_positive / target_total.clamp_min(1), torch.nan
        )
        labelled = target_total.sum()
        return SegmentationScores(
            miou=float(iou.nanmean()) if (union > 0).any() else float("nan"),
            per_class_iou=iou,
            aacc=float(true_positive.sum() / labelled) if labelled > 0 else float("nan"),
            macc=float(accuracy.nanmean()) if (target_total > 0).any() else float("nan"),
            confusion=self.confusion.clone(),
        )
