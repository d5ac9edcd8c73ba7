"""The README's "In a notebook" code on the tier's device (``SPAR_TEST_DEVICE``, default
``cuda``): backbone, teacher, segmenters, ``predict`` and the ``spar.viz`` pictures; and a
segmenter built on the CPU, then moved with ``.to(device)``."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spar.data import SAMPLE_IMAGES, load_image, resize_to_fit
from spar.models import SlidingWindowTeacher, create_backbone
from spar.segmentation import OpenVocabSegmenter
from spar.viz import feature_picture, overlay, pca_rgb, segmentation_picture, to_pil

pytestmark = pytest.mark.gpu

CLASSES = ["sky", "road", "car, automobile", "person, pedestrian", "building"]  # the README's
NAMES = [entry.split(",")[0] for entry in CLASSES]
BOUNDS = (320, 240)  # (long, short): small, yet several teacher windows
IMAGE = SAMPLE_IMAGES / "astronaut.jpg"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def assert_on(tensor: torch.Tensor, device: torch.device, shape: tuple[int, ...]) -> None:
    assert tensor.device == device, f"on {tensor.device}, expected {device}"
    assert tuple(tensor.shape) == shape
    assert torch.isfinite(tensor.float()).all()


def assert_mask(mask: torch.Tensor, device: torch.device, size: tuple[int, int]) -> None:
    assert_on(mask, device, size)
    assert mask.dtype == torch.long
    assert 0 <= int(mask.min()) and int(mask.max()) < len(CLASSES)


@pytest.mark.parametrize("name", ["tiny", "siglip2-tiny", "dinov3txt-tiny"])
def test_readme_notebook_code(device, precision, name):
    """The README block as written, with the backbone moved to the device first ("everything
    follows the backbone's device"), under float32 or bf16 autocast."""
    backbone = create_backbone(name).to(device)
    image = resize_to_fit(load_image(IMAGE), BOUNDS)  # (3, H, W) in [0, 1]
    height, width = image.shape[-2:]
    patch = backbone.patch_size
    grid = (1, backbone.embed_dim, math.ceil(height / patch), math.ceil(width / patch))
    x = backbone.normalize(image)  # (1, 3, H, W)
    assert x.device == device, (
        f"backbone.normalize(image) gave a tensor on {x.device}, not on the backbone's {device}: "
        "the README's next line, backbone(x), then mixes devices"
    )
    with autocast(precision, device):
        with torch.no_grad():
            student = backbone(x)
            teacher = SlidingWindowTeacher(backbone, stride=24)(x)
        segmenter = OpenVocabSegmenter.from_backbone(backbone, CLASSES)
        mask = segmenter.predict(x, output_size=image.shape[-2:])[0]
        teacher_segmenter = OpenVocabSegmenter.from_backbone(
            backbone, CLASSES, dense=SlidingWindowTeacher(backbone)
        )
        teacher_mask = teacher_segmenter.predict(x, output_size=image.shape[-2:])[0]
        with torch.no_grad():
            scores = segmenter.class_probabilities(x)

    assert SlidingWindowTeacher(backbone, stride=24).num_windows(height, width) > 1
    assert_on(student, device, grid)
    assert_on(teacher, device, grid)
    assert teacher.dtype == torch.float32
    for built in (segmenter, teacher_segmenter):
        assert built.text_embeddings.device == device and built.name_to_class.device == device
        assert built.num_classes == len(CLASSES)
    assert_mask(mask, device, (height, width))
    assert_mask(teacher_mask, device, (height, width))
    assert_on(scores, device, (1, len(CLASSES), height, width))
    assert 0 <= scores.min() and scores.max() <= 1

    # spar.viz: the overlay with a legend, one PCA basis for teacher and student.
    picture = overlay(image, mask, NAMES)
    assert isinstance(picture, Image.Image)
    assert picture.width > width and picture.height >= height
    pictures = pca_rgb([teacher[0], student[0]])
    for rgb in pictures:
        assert_on(rgb, device, (3, *grid[-2:]))
        assert 0 <= rgb.min() and rgb.max() <= 1
    assert to_pil(pictures[0]).size == (grid[-1], grid[-2])
    # ... and the one-call pictures the scripts use, with the backbone on the device.
    shown, shown_mask = segmentation_picture(backbone, IMAGE, CLASSES, bounds=BOUNDS)
    assert shown.width > width and tuple(shown_mask.shape) == (height, width)
    features = feature_picture(
        backbone, IMAGE, dense=SlidingWindowTeacher(backbone, stride=48), bounds=BOUNDS
    )
    assert features.width >= 3 * width and features.height >= height


def test_segmenter_built_on_the_cpu_moves_to_the_device(device):
    """``OpenVocabSegmenter(...).to(device)``: the backbone (a submodule) and the text buffers
    move; the result matches the CPU's."""
    backbone = create_backbone("tiny")
    image = resize_to_fit(load_image(IMAGE), BOUNDS)
    height, width = image.shape[-2:]
    x_cpu = backbone.normalize(image)
    segmenter = OpenVocabSegmenter.from_backbone(backbone, CLASSES)
    teacher_segmenter = OpenVocabSegmenter.from_backbone(
        backbone, CLASSES, dense=SlidingWindowTeacher(backbone, stride=48)
    )
    with torch.no_grad():
        cpu_features = backbone(x_cpu)
        cpu_scores = segmenter.class_probabilities(x_cpu)
        cpu_teacher_scores = teacher_segmenter.class_probabilities(x_cpu)

    assert segmenter.to(device) is segmenter and teacher_segmenter.to(device) is teacher_segmenter
    assert backbone.device == device
    for moved in (segmenter, teacher_segmenter):
        assert moved.text_embeddings.device == device and moved.name_to_class.device == device
    x = x_cpu.to(device)
    with torch.no_grad():
        features = backbone(x)
        scores = segmenter.class_probabilities(x)
        teacher_scores = teacher_segmenter.class_probabilities(x)
    mask = segmenter.predict(x)[0]
    teacher_mask = teacher_segmenter.predict(x, output_size=(height // 2, width // 2))[0]

    assert_on(features, device, tuple(cpu_features.shape))
    assert_on(scores, device, (1, len(CLASSES), height, width))
    assert_on(teacher_scores, device, (1, len(CLASSES), height, width))
    assert_mask(mask, device, (height, width))
    assert_mask(teacher_mask, device, (height // 2, width // 2))
    # Same numbers as on the CPU, up to the device's float32 kernels.
    cosine = F.cosine_similarity(features.cpu(), cpu_features, dim=1)
    assert cosine.min() > 0.99 and cosine.mean() > 0.999
    torch.testing.assert_close(scores.cpu(), cpu_scores, rtol=0, atol=2e-2)
    torch.testing.assert_close(teacher_scores.cpu(), cpu_teacher_scores, rtol=0, atol=2e-2)


def test_segmenter_scores_stay_float32_under_bf16_autocast(device):
    """``name_logits`` and ``class_probabilities`` document float32 results. Under bf16 autocast
    (what eval and the notebook use with bf16) the cosine must not drop to bf16: with
    ``logit_scale`` 40 a bf16 cosine moves the logits in steps of about 0.16, enough to flip
    near ties."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{device} has no bf16 support")
    backbone = create_backbone("tiny").to(device)
    x = backbone.normalize(resize_to_fit(load_image(IMAGE), BOUNDS)).to(device)
    segmenter = OpenVocabSegmenter.from_backbone(backbone, CLASSES)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        name_logits = segmenter.name_logits(x)
        scores = segmenter.class_probabilities(x)
    assert name_logits.dtype == torch.float32, f"name_logits gave {name_logits.dtype}"
    assert scores.dtype == torch.float32, f"class_probabilities gave {scores.dtype}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_backbone_equals_eager(device, precision):
    """``create_backbone(..., compile=True)`` on the device: two image sizes (one graph, dynamic
    shapes), the compiled features equal the eager ones up to the precision's rounding."""
    eager = create_backbone("tiny").to(device)
    compiled = create_backbone("tiny", compile=True).to(device)
    for size in ((224, 320), (256, 384)):
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), autocast(precision, device):
            want, got = eager(x).float(), compiled(x).float()
        assert got.device == device
        error = ((got - want).norm() / want.norm()).item()
        assert error < (1e-4 if precision == "fp32" else 2e-2), f"{size}: relative error {error}"
