"""Sliding-window teacher: layout, stitching invariants, batching, bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

from spar.models import SlidingWindowTeacher, WindowLayout, dense_features
from spar.models.teacher import stitch_upsampling_factor, window_offsets


def dyadic_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, H, W) with values k/8: patch means and window averages are exact in float32."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (1, 3, height, width), generator=generator).float() / 8


def smooth_image(height: int, width: int) -> torch.Tensor:
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    channels = [torch.sin(3 * ys + 2 * xs), torch.cos(2 * ys - xs), ys * xs]
    return torch.stack(channels)[None]


def reference_stitch(backbone, images, window, stride, patch=16):
    """The paper's stitching written plainly, one window at a time (for comparison)."""
    images = F.pad(images, (0, -images.shape[3] % patch, 0, -images.shape[2] % patch))
    height, width = images.shape[-2:]
    r = stitch_upsampling_factor(patch, stride)
    cell = patch // r
    canvas = torch.zeros(images.shape[0], backbone.embed_dim, height // cell, width // cell)
    count = torch.zeros(height // cell, width // cell)
    wh, ww = min(window, height), min(window, width)
    for y in window_offsets(height, wh, stride):
        for x in window_offsets(width, ww, stride):
            features = backbone(images[:, :, y : y + wh, x : x + ww])
            features = F.interpolate(features, scale_factor=r, mode="bilinear", align_corners=False)
            canvas[:, :, y // cell : (y + wh) // cell, x // cell : (x + ww) // cell] += features
            count[y // cell : (y + wh) // cell, x // cell : (x + ww) // cell] += 1
    canvas = canvas / count
    return F.interpolate(canvas, size=(height // patch, width // patch), mode="bilinear")


@pytest.mark.parametrize(
    ("length", "window", "stride", "expected"),
    [
        (224, 224, 24, [0]),
        (100, 224, 24, [0]),
        (272, 224, 24, [0, 24, 48]),
        (280, 224, 24, [0, 24, 48, 56]),
        (512, 224, 112, [0, 112, 224, 288]),
    ],
)
def test_window_offsets_cover_and_end_flush(length, window, stride, expected):
    offsets = window_offsets(length, window, stride)
    assert offsets == expected
    assert offsets[-1] + min(window, length) == max(length, min(window, length))


@pytest.mark.parametrize(
    ("stride", "factor"), [(24, 2), (16, 1), (32, 1), (48, 1), (8, 2), (12, 4), (7, 16)]
)
def test_stitch_factor_is_the_smallest_that_fits(stride, factor):
    assert stitch_upsampling_factor(16, stride) == factor


def test_layout_counts_windows_and_coverage():
    layout = WindowLayout.plan((272, 320), (224, 224), (24, 24), 16)
    assert len(layout.origins) == 3 * 5
    coverage = layout.coverage()
    assert coverage.shape == (34, 40)
    assert coverage.min() >= 1
    assert coverage[0, 0] == 1 and coverage.max() == 15


@pytest.mark.parametrize("stride", [16, 24, 32, 40, 64])
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (100, 150), (40, 200), (250, 90), (17, 33)])
def test_teacher_map_has_the_student_shape(patch_average_backbone, stride, size):
    teacher = SlidingWindowTeacher(patch_average_backbone, stride=stride, batch_size=5)
    images = torch.rand(2, 3, *size)
    stitched = teacher(images)
    assert stitched.shape == patch_average_backbone(images).shape
    assert stitched.shape[-2:] == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))


# The sizes cover both ends of both axes (a larger one, (300, 301), took 9 s and added nothing).
@pytest.mark.parametrize("size", [(64, 64), (80, 200), (272, 96)])
def test_every_stride_up_to_the_window_covers_every_cell(patch_average_backbone, size):
    for stride in range(1, 65):
        teacher = SlidingWindowTeacher(patch_average_backbone, window=64, stride=stride)
        coverage = teacher.layout(*size).coverage()
        assert coverage.min() >= 1, f"stride {stride} leaves cells of {size} uncovered"
    stitched = teacher(dyadic_image(*size))  # stride = window
    assert torch.isfinite(stitched).all()
    assert torch.equal(stitched, patch_average_backbone(dyadic_image(*size)))


@pytest.mark.parametrize("stride", [65, 100, 500, (24, 65)])
def test_a_stride_larger_than_the_window_is_rejected_with_the_numbers(
    patch_average_backbone, stride
):
    with pytest.raises(ValueError, match=r"stride .*65|stride .*100|stride .*500") as error:
        SlidingWindowTeacher(patch_average_backbone, window=64, stride=stride)
    assert "(64, 64)" in str(error.value) and "uncovered" in str(error.value)
    with pytest.raises(ValueError, match="stride 500 is larger than the window 224"):
        window_offsets(896, 224, 500)


@pytest.mark.parametrize("stride", [16, 32, 48, 64])
@pytest.mark.parametrize("size", [(160, 208), (100, 150)])
def test_local_backbone_with_patch_multiple_stride_is_exact(patch_average_backbone, stride, size):
    images = dyadic_image(*size)
    teacher = SlidingWindowTeacher(patch_average_backbone, stride=stride)
    assert torch.equal(teacher(images), patch_average_backbone(images))


def test_local_backbone_with_stride_24_stays_close_on_smooth_images(patch_average_backbone):
    images = smooth_image(192, 256)
    single = patch_average_backbone(images)
    stitched = SlidingWindowTeacher(patch_average_backbone, stride=24)(images)
    relative = (stitched - single).norm() / single.norm()
    assert relative < 0.02
    assert not torch.equal(stitched, single), "stride 24 goes through the 8 px cell canvas"


@pytest.mark.parametrize(
    ("size", "window"), [((200, 180), 224), ((224, 224), 224), ((64, 300), 304)]
)
def test_window_covering_the_image_is_one_forward_pass(tiny_backbone, size, window):
    images = torch.randn(1, 3, *size)
    teacher = SlidingWindowTeacher(tiny_backbone, window=window, stride=24)
    with torch.no_grad():
        assert torch.equal(teacher(images), tiny_backbone(images))


@pytest.mark.parametrize("name", ["tiny_backbone", "tiny_siglip2"])
@pytest.mark.parametrize("stride", [24, 32, 40])
def test_vectorised_stitching_matches_the_plain_reference(request, name, stride):
    backbone = request.getfixturevalue(name)
    images = torch.randn(1, 3, 150, 200)
    teacher = SlidingWindowTeacher(backbone, window=96, stride=stride, batch_size=4)
    with torch.no_grad():
        expected = reference_stitch(backbone, images, 96, stride)
        torch.testing.assert_close(teacher(images), expected, rtol=1e-5, atol=1e-5)


def test_window_batching_does_not_change_the_result(tiny_backbone):
    images = torch.randn(2, 3, 130, 170)
    results = [
        SlidingWindowTeacher(tiny_backbone, window=96, stride=24, batch_size=b)(images)
        for b in (1, 7, 1000)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


def test_batch_of_images_equals_images_one_by_one(tiny_backbone):
    images = torch.randn(3, 3, 112, 144)
    teacher = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, batch_size=16)
    together = teacher(images)
    for index in range(3):
        alone = teacher(images[index : index + 1])
        torch.testing.assert_close(together[index : index + 1], alone, rtol=1e-5, atol=1e-5)


def test_windows_run_in_bounded_batches(patch_average_backbone):
    teacher = SlidingWindowTeacher(patch_average_backbone, stride=16, batch_size=6)
    teacher(torch.rand(2, 3, 160, 160))
    windows = 2 * teacher.num_windows(160, 160)
    assert patch_average_backbone.largest_batch == 6
    assert patch_average_backbone.calls == math.ceil(windows / 6)


def test_small_image_dimension_shrinks_the_window(patch_average_backbone):
    teacher = SlidingWindowTeacher(patch_average_backbone, window=64, stride=16)
    layout = teacher.layout(40, 300)
    assert layout.window == (48, 64)
    assert {y for y, _ in layout.origins} == {0}


def test_teacher_exposes_the_backbone_contract(tiny_backbone):
    teacher = SlidingWindowTeacher(tiny_backbone)
    assert teacher.window == (224, 224)
    assert (teacher.patch_size, teacher.embed_dim) == (16, 64)
    assert teacher.mean == tiny_backbone.mean and teacher.native_size == (224, 224)
    assert teacher.encode_text(["cat"]).shape == (1, 64)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 0},
        {"stride": -24},
        {"window": 0},
        {"window": -64},
        {"window": 100},
        {"batch_size": 0},
        {"stride": 2.5},
    ],
)
def test_bad_arguments_are_rejected(patch_average_backbone, kwargs):
    with pytest.raises(ValueError):
        SlidingWindowTeacher(patch_average_backbone, **kwargs)


def test_bad_images_are_rejected(patch_average_backbone):
    teacher = SlidingWindowTeacher(patch_average_backbone)
    with pytest.raises(ValueError, match="shape"):
        teacher(torch.rand(3, 64, 64))


@pytest.mark.parametrize("stride", [16, 24, 40])
def test_batched_gather_and_scatter_equal_one_window_at_a_time_exactly(
    patch_average_backbone, stride
):
    images = torch.rand(2, 3, 120, 170)
    one_by_one = SlidingWindowTeacher(patch_average_backbone, stride=stride, batch_size=1)(images)
    batched = SlidingWindowTeacher(patch_average_backbone, stride=stride, batch_size=1000)(images)
    assert torch.equal(one_by_one, batched)
    for index in range(2):
        reference = reference_stitch(patch_average_backbone, images[index : index + 1], 64, stride)
        torch.testing.assert_close(batched[index : index + 1], reference, rtol=1e-6, atol=1e-6)


@pytest.fixture
def padding_only_compile(monkeypatch):
    """``torch.compile`` replaced by the identity, so ``compile=True`` pads the last chunk of
    windows but runs eagerly; returns the window-batch sizes the forward saw."""
    sizes = []

    def recording(forward, **_):
        def run(crops):
            sizes.append(crops.shape[0])
            return forward(crops)

        return run

    monkeypatch.setattr(torch, "compile", recording)
    return sizes


@pytest.mark.parametrize("stride", [16, 24, 40])
def test_padding_the_last_chunk_leaves_the_stitching_bitwise_unchanged(
    patch_average_backbone, padding_only_compile, stride
):
    images = torch.rand(2, 3, 120, 170)
    eager = SlidingWindowTeacher(patch_average_backbone, stride=stride, batch_size=7)
    padded = SlidingWindowTeacher(patch_average_backbone, stride=stride, batch_size=7, compile=True)
    windows = 2 * eager.num_windows(120, 170)
    assert windows % 7, "the last chunk must be a partial one"
    result = padded(images)
    assert padding_only_compile == [7] * math.ceil(windows / 7)
    assert torch.equal(result, eager(images))
    for index in range(2):
        reference = reference_stitch(patch_average_backbone, images[index : index + 1], 64, stride)
        torch.testing.assert_close(result[index : index + 1], reference, rtol=1e-6, atol=1e-6)


def test_padded_last_chunk_matches_the_plain_reference_on_a_transformer(
    tiny_backbone, padding_only_compile
):
    images = torch.randn(1, 3, 150, 200)
    teacher = SlidingWindowTeacher(tiny_backbone, window=96, stride=24, batch_size=5, compile=True)
    with torch.no_grad():
        expected = reference_stitch(tiny_backbone, images, 96, 24)
        torch.testing.assert_close(teacher(images), expected, rtol=1e-5, atol=1e-5)
    assert set(padding_only_compile) == {5} and teacher.num_windows(150, 200) % 5


def test_dense_features_names_the_student_or_the_teacher(patch_average_backbone):
    assert dense_features(patch_average_backbone, "student") is patch_average_backbone
    teacher = dense_features(patch_average_backbone, "teacher", {"stride": 32, "window": 64})
    assert isinstance(teacher, SlidingWindowTeacher) and teacher.stride == (32, 32)
    with pytest.raises(ValueError, match=r"features must be one of \('student', 'teacher'\)"):
        dense_features(patch_average_backbone, "single")
