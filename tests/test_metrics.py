"""MeanIoU against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from spar.metrics import MeanIoU

# target / prediction, 3 classes, one ignored pixel (255):
#   target  [[0, 0, 1], [1, 2, 255]]
#   pred    [[0, 1, 1], [1, 1, 0]]
# confusion (rows target, cols pred): class 0: (0->0) 1, (0->1) 1; class 1: (1->1) 2;
# class 2: (2->1) 1.  IoU0 = 1 / (2 + 1 - 1) = 1/2; IoU1 = 2 / (2 + 4 - 2) = 1/2;
# IoU2 = 0 / (1 + 0 - 0) = 0.  mIoU = 1/3; aacc = 3/5; macc = (1/2 + 1 + 0) / 3 = 1/2.
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 1, 0]])


def test_hand_computed_case():
    metric = MeanIoU(num_classes=3)
    metric.update(PRED, TARGET)
    scores = metric.compute()
    assert scores.per_class_iou.tolist() == [0.5, 0.5, 0.0]
    assert scores.miou == pytest.approx(1 / 3)
    assert scores.aacc == pytest.approx(3 / 5)
    assert scores.macc == pytest.approx(0.5)
    assert scores.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_class_absent_from_both_is_excluded():
    metric = MeanIoU(num_classes=4)
    metric.update(PRED, TARGET)
    scores = metric.compute()
    assert math.isnan(scores.per_class_iou[3])
    assert scores.miou == pytest.approx(1 / 3)


def test_class_only_predicted_counts_with_zero_iou():
    metric = MeanIoU(num_classes=3)
    metric.update(torch.tensor([2, 1]), torch.tensor([1, 1]))
    scores = metric.compute()
    # class 0 absent -> NaN; class 1 IoU 1/2; class 2 predicted only -> 0
    assert math.isnan(scores.per_class_iou[0])
    assert scores.miou == pytest.approx(0.25)


def test_accumulating_equals_one_update_over_everything():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (4, 6, 7), generator=generator)
    targets = torch.randint(0, 5, (4, 6, 7), generator=generator)
    targets[0, 0, :3] = 255
    whole, parts = MeanIoU(5), MeanIoU(5)
    whole.update(preds, targets)
    for pred, target in zip(preds, targets, strict=True):
        parts.update(pred.numpy(), target.numpy())
    assert torch.equal(whole.confusion, parts.confusion)
    assert whole.compute().miou == parts.compute().miou


def test_merging_shards():
    first, second, whole = MeanIoU(3), MeanIoU(3), MeanIoU(3)
    first.update(PRED[:1], TARGET[:1])
    second.update(PRED[1:], TARGET[1:])
    whole.update(PRED, TARGET)
    assert torch.equal(first.merge(second).confusion, whole.confusion)
    with pytest.raises(ValueError, match="merge"):
        first.merge(MeanIoU(4))


def test_reset_clears_the_matrix():
    metric = MeanIoU(3)
    metric.update(PRED, TARGET)
    metric.reset()
    assert metric.confusion.sum() == 0
    assert math.isnan(metric.compute().miou)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        MeanIoU(3).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        ([0, 3], [0, 1], r"prediction values \[3\]"),
        ([0, 1], [7, 1], r"target values \[7\]"),
        ([0, -1], [0, 1], r"prediction values \[-1\]"),
    ],
)
def test_out_of_range_values_are_named(pred, target, message):
    with pytest.raises(ValueError, match=message):
        MeanIoU(3).update(torch.tensor(pred), torch.tensor(target))


def test_predictions_are_checked_at_ignored_pixels_too():
    with pytest.raises(ValueError, match=r"prediction values \[255\]"):
        MeanIoU(3).update(torch.tensor([0, 255]), torch.tensor([0, 255]))


def test_ignored_pixels_do_not_count():
    # the same example without its ignored pixel gives the same matrix
    with_ignored, without = MeanIoU(3), MeanIoU(3)
    with_ignored.update(PRED, TARGET)
    without.update(PRED.flatten()[:5], TARGET.flatten()[:5])
    assert torch.equal(with_ignored.confusion, without.confusion)
    assert with_ignored.confusion.sum() == 5


def test_confusion_is_the_live_accumulator():
    # what an all-reduce does: add the other shards' counts in place
    metric = MeanIoU(3)
    metric.update(PRED, TARGET)
    metric.confusion.add_(metric.confusion.clone())
    scores = metric.compute()
    assert scores.confusion.tolist() == [[2, 2, 0], [0, 4, 0], [0, 2, 0]]
    assert scores.miou == pytest.approx(1 / 3)
    scores.confusion.zero_()  # the scores hold a copy
    assert metric.confusion.sum() == 10


def test_float_predictions_are_rejected():
    with pytest.raises(ValueError, match="integer"):
        MeanIoU(3).update(np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int64))
