"""The evaluation resize is mmseg's ``Resize(scale=bounds, keep_ratio=True)``: mmcv's
``rescale_size`` rule for the size and ``cv2.resize(INTER_LINEAR)`` of the uint8 image (no
antialiasing, whole 8-bit levels). Expected values are hand-computed literals, or cv2's output
(opencv-python-headless, the ``dev`` extra; those tests skip without it)."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spar.data import load_image, resize_to_fit
from spar.data.images import fit_size

SAMPLES = Path(__file__).resolve().parents[1] / "spar" / "assets" / "samples"


# (H, W), (long, short) bounds -> (h, w), by hand from mmcv's rescale_size:
# scale = min(long / max(H, W), short / min(H, W)); side = int(side * scale + 0.5).
@pytest.mark.parametrize(
    "size, bounds, expected",
    [
        ((375, 500), (2048, 672), (672, 896)),  # scale 672/375 = 1.792; 500 * 1.792 = 896.0
        ((1024, 2048), (2048, 1024), (1024, 2048)),  # cityscapes: scale 1, unchanged
        ((1024, 2048), (2048, 672), (672, 1344)),  # scale 0.65625
        ((333, 517), (2048, 672), (672, 1043)),  # 517 * 672 / 333 = 1043.32
        ((1200, 901), (2048, 672), (895, 672)),  # 1200 * 672 / 901 = 895.006
        ((90, 130), (160, 128), (111, 160)),  # long side binds: 90 * 160 / 130 = 110.77 -> 111
        ((1344, 2689), (2048, 672), (672, 1345)),  # 2689 * 0.5 = 1344.5 -> 1345 (half up)
        ((512, 512), (672, 2048), (672, 672)),  # bounds in either order
    ],
)
def test_fit_size_is_mmcv_rescale_size(size, bounds, expected):
    assert fit_size(*size, bounds) == expected


def _from_levels(rows: list[list[int]]) -> torch.Tensor:
    """(H, W) 8-bit levels -> (3, H, W) float image in [0, 1], the same in every channel."""
    return torch.tensor(rows, dtype=torch.float32).div(255).expand(3, -1, -1).contiguous()


def _levels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W) levels of channel 0 (the channels are equal here),
    rounded to whole levels; the test above checks that they are whole to float precision."""
    return np.rint(image[0].double().numpy() * 255)


def test_upscaling_is_bilinear_with_half_pixel_centres():
    # (2, 4) -> (4, 8), scale 2: output x samples x / 2 - 0.25; the first and last columns
    # sit outside the pixel centres and copy the edge pixel. Row 1 of the output is
    # 3/4 row0 + 1/4 row1; row 2 is 1/4 row0 + 3/4 row1; rows 0 and 3 copy the edges.
    image = _from_levels([[0, 100, 200, 40], [200, 100, 0, 40]])
    resized = resize_to_fit(image, (8, 4))
    expected = [
        [0, 25, 75, 125, 175, 160, 80, 40],  # row 0 along x
        [50, 63, 88, 113, 138, 123, 68, 40],  # (3 row0 + row1) / 4, halves rounded up
        [150, 138, 113, 88, 63, 48, 43, 40],  # (row0 + 3 row1) / 4
        [200, 175, 125, 75, 25, 10, 30, 40],  # row 1 along x
    ]
    np.testing.assert_array_equal(_levels(resized), expected)


def test_downscaling_does_not_antialias():
    # (2, 8) -> (1, 4), scale 1/2: every output pixel samples the centre of a 2x2 block, the
    # block's mean (rounded half up); an antialiasing filter would mix the neighbouring
    # blocks in, nearest would pick one pixel of the block.
    image = _from_levels(
        [[0, 40, 200, 120, 8, 8, 250, 3], [40, 80, 100, 60, 8, 8, 0, 0]],
    )
    resized = resize_to_fit(image, (4, 1))
    np.testing.assert_array_equal(_levels(resized), [[40, 120, 8, 63]])


def test_resize_keeps_dtype_batch_and_whole_levels():
    image = torch.rand(2, 3, 30, 50)
    resized = resize_to_fit(image, (40, 20))
    assert resized.shape == (2, 3, 20, 33) and resized.dtype == torch.float32  # 50 * 0.667
    levels = resized.double() * 255
    assert float((levels - levels.round()).abs().max()) < 1e-4  # k / 255 in float32
    assert 0 <= float(resized.min()) and float(resized.max()) <= 1
    assert resize_to_fit(image.half(), (40, 20)).dtype == torch.float16
    same = torch.rand(3, 20, 40)
    assert resize_to_fit(same, (40, 20)) is same  # already fits: untouched


def _generated_jpeg(folder: Path, height: int, width: int, seed: int) -> Path:
    """A JPEG of odd size with gradients, a stripe pattern and noise (fine detail)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 64 * 4], -1)
    pixels = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    path = folder / f"generated_{height}x{width}.jpg"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    generated = [_generated_jpeg(folder, h, w, i) for i, (h, w) in enumerate(SIZES)]
    return sorted(SAMPLES.glob("*.jpg")) + generated


SIZES = [(333, 517), (1200, 901), (90, 130)]


@pytest.mark.parametrize("bounds", [(160, 128), (2048, 672)])  # mostly down; up
def test_resize_equals_cv2_inter_linear_on_uint8(jpegs, bounds):
    cv2 = pytest.importorskip("cv2")
    for path in jpegs:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        if bounds == (2048, 672) and pixels.shape[0] * pixels.shape[1] > 150_000:
            continue  # the large up-scale of the smallest images only (time)
        image = load_image(path)
        resized = resize_to_fit(image, bounds)
        height, width = resized.shape[-2:]
        expected = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
        got = np.rint(resized.permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)
        assert (got != expected).sum() == 0, (path.name, bounds)
