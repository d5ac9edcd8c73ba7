"""Per-axis stitching of the sliding-window teacher against a plain-numpy reference.

The reference follows the SPAR authors' teacher (naomikombol/SPAR, segmentors/segmentor_vit.py,
commit 0f63ff2: ``unfold_with_boundary``, ``fold_from_patches``, ``forward_slide``), written
here per axis: window origins ``0, s, 2s, ...`` while the window fits plus one flush with the
far border; each window's map upsampled bilinearly by ``r`` (smallest r with ``p % r == 0`` and
``s % (p / r) == 0``, one r per axis) and added on a canvas of ``p / r``-pixel cells at its
origin; the canvas divided by the coverage count and resized bilinearly to the patch grid.
Nothing here calls spar's layout or stitching helpers.
"""

import numpy as np
import pytest
import torch
from torch import nn

from spar.models import SlidingWindowTeacher

PATCH = 16


class PatchMeanBackbone(nn.Module):
    """Each output cell is its patch's mean colour, (B, 3, H, W) -> (B, 3, H/16, W/16)."""

    patch_size = PATCH
    embed_dim = 3
    native_size = (64, 64)
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def forward(self, images):
        return nn.functional.avg_pool2d(images, PATCH)


class WindowMeanBackbone(PatchMeanBackbone):
    """Every cell of a window's map is the window's mean colour (a constant map per window)."""

    def forward(self, images):
        pooled = nn.functional.avg_pool2d(images, PATCH)
        return pooled.mean(dim=(2, 3), keepdim=True).expand_as(pooled).contiguous()


def origins(length, window, stride):
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def factor(stride):
    return next(r for r in range(1, PATCH + 1) if PATCH % r == 0 and stride % (PATCH // r) == 0)


def bilinear_matrix(size_in, size_out):
    """(size_out, size_in) weights of a 1-D bilinear resize, half-pixel centres, edges clamped."""
    weights = np.zeros((size_out, size_in))
    for out in range(size_out):
        source = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(np.floor(source)), size_in - 1)
        high = min(low + 1, size_in - 1)
        fraction = source - low
        weights[out, low] += 1 - fraction
        weights[out, high] += fraction
    return weights


def resize(maps, size):
    """(C, h, w) -> (C, *size) bilinear, as two 1-D resizes."""
    rows = bilinear_matrix(maps.shape[1], size[0])
    cols = bilinear_matrix(maps.shape[2], size[1])
    return np.einsum("yh,chw,xw->cyx", rows, maps, cols)


def patch_means(pixels):
    c, h, w = pixels.shape
    return pixels.reshape(c, h // PATCH, PATCH, w // PATCH, PATCH).mean(axis=(2, 4))


def expected_stitch(image, window, stride, window_map):
    """(3, H, W) numpy image -> (C, ceil(H/16), ceil(W/16)) stitched the authors' way, per axis."""
    c, h, w = image.shape
    height, width = -(-h // PATCH) * PATCH, -(-w // PATCH) * PATCH
    padded = np.zeros((c, height, width))
    padded[:, :h, :w] = image
    win = (min(window[0], height), min(window[1], width))
    cell = (PATCH // factor(stride[0]), PATCH // factor(stride[1]))
    canvas = np.zeros((c, height // cell[0], width // cell[1]))
    count = np.zeros(canvas.shape[1:])
    cells = (win[0] // cell[0], win[1] // cell[1])
    for y in origins(height, win[0], stride[0]):
        for x in origins(width, win[1], stride[1]):
            features = window_map(padded[:, y : y + win[0], x : x + win[1]])
            if features.shape[1:] != cells:
                features = resize(features, cells)
            rows = slice(y // cell[0], y // cell[0] + cells[0])
            cols = slice(x // cell[1], x // cell[1] + cells[1])
            canvas[:, rows, cols] += features
            count[rows, cols] += 1
    assert count.min() >= 1
    canvas /= count
    grid = (height // PATCH, width // PATCH)
    return canvas if canvas.shape[1:] == grid else resize(canvas, grid)


def window_mean_map(pixels):
    means = patch_means(pixels)
    return np.broadcast_to(means.mean(axis=(1, 2), keepdims=True), means.shape)


CASES = [
    # (stride, window, image (H, W)): non-square strides and windows, padded images
    ((32, 24), (64, 48), (104, 120)),
    ((24, 32), (48, 64), (120, 104)),
    ((32, 40), (64, 48), (112, 136)),
    ((48, 12), (64, 32), (96, 88)),
]


@pytest.mark.parametrize(("stride", "window", "size"), CASES)
@pytest.mark.parametrize(
    ("backbone", "window_map"),
    [(PatchMeanBackbone, patch_means), (WindowMeanBackbone, window_mean_map)],
    ids=["patch-mean", "window-mean"],
)
def test_stitching_is_per_axis_like_the_numpy_reference(stride, window, size, backbone, window_map):
    rng = np.random.default_rng(sum(stride) + size[0])
    image = rng.standard_normal((3, *size))
    expected = expected_stitch(image, window, stride, window_map)
    teacher = SlidingWindowTeacher(backbone(), window=window, stride=stride, batch_size=7)
    stitched = teacher(torch.from_numpy(image).float()[None])[0].double().numpy()
    assert stitched.shape == expected.shape
    np.testing.assert_allclose(stitched, expected, atol=1e-5, rtol=0)


def test_window_mean_maps_average_by_coverage_on_a_hand_sized_layout():
    """stride (32, 24), window (32, 32), a 32 x 64 image: one row of windows at x = 0, 24, 32;
    factors (1, 2), so 8-pixel cells along x. An image that is 1 on its left half and 3 on its
    right half gives window means 1, 2.5 and 3."""
    image = np.ones((3, 32, 64))
    image[:, :, 32:] = 3.0
    teacher = SlidingWindowTeacher(WindowMeanBackbone(), window=32, stride=(32, 24))
    stitched = teacher(torch.from_numpy(image).float()[None])[0, 0].numpy()
    # cell columns (8 px): windows cover cols 0-3 (mean 1), 3-6 (2.5), 4-7 (3)
    canvas = np.array([1, 1, 1, (1 + 2.5) / 2, (2.5 + 3) / 2, (2.5 + 3) / 2, (2.5 + 3) / 2, 3])
    # bilinear 8 -> 4 with half-pixel centres is the mean of neighbouring pairs
    row = canvas.reshape(4, 2).mean(axis=1)
    np.testing.assert_allclose(stitched, np.stack([row, row]), atol=1e-6)
