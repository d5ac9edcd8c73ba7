"""The student's training step against plain autograd and a hand-written AdamW step.

``StudentOptimizer.train_step`` backpropagates ``mse(student(x), t) / accumulated`` (MSE averaged
over every element), clips the accumulated gradient's total norm at the last micro-step, then
takes one AdamW step. Every expected value is computed here with plain autograd on a copy of the
tiny student, or by hand: nothing is read back from the code under test.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spar.distill.optimization import StudentOptimizer
from spar.distill.settings import OptimSettings

CPU = torch.device("cpu")
LR, WEIGHT_DECAY, EPS = 1e-3, 1e-2, 1e-8


@pytest.fixture
def student(tiny_backbone):
    # A private copy (the shared backbone stays as it is); last two blocks trainable.
    model = copy.deepcopy(tiny_backbone).train()
    model.set_trainable_blocks("last-2")  # the training configs' setting
    return model


def batch(n, seed=0, size=(48, 64)):
    """(n, 3, H, W) images and (n, 64, H/16, W/16) targets."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *size, generator=generator)
    targets = torch.randn(n, 64, size[0] // 16, size[1] // 16, generator=generator)
    return images, targets


def optimizer_for(student, grad_clip=None):
    settings = OptimSettings(lr=LR, weight_decay=WEIGHT_DECAY)
    return StudentOptimizer(
        student, settings, device=CPU, total_steps=10, precision="fp32", grad_clip=grad_clip
    )


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def reference_gradients(model, micro_batches, accumulate):
    """Plain autograd on a copy: sum over micro-batches of grad(mse_mean(model(x), t) / acc)."""
    twin = copy.deepcopy(model)
    for images, targets in micro_batches:
        (F.mse_loss(twin(images), targets) / accumulate).backward()
    return {name: p.grad.detach().clone() for name, p in trainable(twin)}


def assert_parameters_close(actual, expected, gradient, atol):
    """Parameters after a first AdamW step, where it is well conditioned: the step moves each
    entry by about lr * g / (|g| + eps), which for |g| near eps turns fp32 rounding of g into a
    visible change; there (|g| <= 1e-5) only the bound of one step, 2 lr, is checked."""
    sharp = gradient.abs() > 1e-5
    torch.testing.assert_close(actual[sharp], expected[sharp], rtol=0, atol=atol)
    assert (actual - expected).abs().max().item() <= 2 * LR + atol


def assert_gradients(model, expected, rtol=1e-5):
    for name, p in trainable(model):
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(p.grad, expected[name], rtol=rtol, atol=rtol * scale + 1e-12)


def test_the_returned_loss_is_the_elementwise_mean_squared_error(student):
    images, targets = batch(2)
    with torch.no_grad():
        prediction = copy.deepcopy(student)(images).numpy().astype(np.float64)
    expected = np.mean((prediction - targets.numpy()) ** 2)
    loss = optimizer_for(student).train_step(images, targets, accumulated=3, update=False)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_gradient_is_that_of_the_mean_mse_divided_by_the_accumulation_count(student, accumulate):
    images, targets = batch(2, seed=1)
    expected = reference_gradients(student, [(images, targets)], accumulate)
    optimizer_for(student).train_step(images, targets, accumulated=accumulate, update=False)
    assert_gradients(student, expected)


def test_two_micro_steps_of_one_view_accumulate_to_one_step_of_two_views(student):
    images, targets = batch(2, seed=2)
    split_student, joint_student = student, copy.deepcopy(student)
    split = optimizer_for(split_student)
    joint = optimizer_for(joint_student)
    split.train_step(images[:1], targets[:1], accumulated=2, update=False)
    split.train_step(images[1:], targets[1:], accumulated=2, update=False)
    joint.train_step(images, targets, accumulated=1, update=False)
    expected = {name: p.grad.clone() for name, p in trainable(joint_student)}
    assert_gradients(split_student, expected)
    # and the same through the optimizer step: the parameters after it agree
    split_student.zero_grad(set_to_none=True)
    joint_student.zero_grad(set_to_none=True)
    split.train_step(images[:1], targets[:1], accumulated=2, update=False)
    split.train_step(images[1:], targets[1:], accumulated=2, update=True)
    joint.train_step(images, targets, accumulated=1, update=True)
    for (name, a), (_, b) in zip(trainable(split_student), trainable(joint_student), strict=True):
        assert_parameters_close(a.detach(), b.detach(), expected[name], atol=1e-7)


def test_the_step_is_one_adamw_step_on_that_gradient(student):
    """AdamW's first step by hand: p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    images, targets = batch(2, seed=3)
    gradients = reference_gradients(student, [(images, targets)], 1)
    before = {name: p.detach().clone() for name, p in trainable(student)}
    optimizer_for(student).train_step(images, targets)
    for name, p in trainable(student):
        g = gradients[name]
        expected = before[name] * (1 - LR * WEIGHT_DECAY) - LR * g / (g.abs() + EPS)
        assert_parameters_close(p.detach(), expected, g, atol=5e-8)


def record_gradients_at_the_optimizer_step(optimization):
    """Gradients as the AdamW step sees them (after clipping; the step then zeroes them)."""
    seen = {}

    def record(optimizer, args, kwargs):
        seen.update({id(p): p.grad.detach().clone() for p in optimization.parameters})

    optimization.optimizer.register_step_pre_hook(record)
    return seen


@pytest.mark.parametrize("fraction", [0.25, 2.0])
def test_clipping_scales_the_accumulated_gradient_to_the_bound(student, fraction):
    images, targets = batch(2, seed=4)
    micro = [(images[:1], targets[:1]), (images[1:], targets[1:])]
    gradients = reference_gradients(student, micro, 2)
    norm = float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in gradients.values())))
    clip = fraction * norm
    optimization = optimizer_for(student, grad_clip=clip)
    seen = record_gradients_at_the_optimizer_step(optimization)
    optimization.train_step(*micro[0], accumulated=2, update=False)
    optimization.train_step(*micro[1], accumulated=2, update=True)
    clipped = {name: seen[id(p)] for name, p in trainable(student)}
    clipped_norm = float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in clipped.values())))
    assert clipped_norm <= clip * (1 + 1e-5)
    scale = min(1.0, clip / norm)  # the unclipped direction, scaled down to the bound
    assert clipped_norm == pytest.approx(min(clip, norm), rel=1e-4)
    for name, g in clipped.items():
        expected = gradients[name] * scale
        torch.testing.assert_close(
            g, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item() + 1e-12
        )
