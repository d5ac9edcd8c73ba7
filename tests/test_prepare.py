"""``backbone.prepare``: images (files, Pillow, tensors, lists) -> the backbone's input batch; and
the layering that lets the models package own it without importing ``spar.data``."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spar
from spar.imaging import load_image, prepare_images, resize_to_fit
from spar.models import create_backbone

# The tiny backbone is a CLIP model: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD.
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
BOUNDS = (32, 16)  # a 40x60 (H x W) image fits as 16x24: scale min(32/60, 16/40) = 0.4


def by_hand(pixels: torch.Tensor, bounds=BOUNDS) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, h, w): the protocol's resize, CLIP normalisation."""
    resized = resize_to_fit(pixels, bounds) if bounds is not None else pixels
    return ((resized - CLIP_MEAN) / CLIP_STD)[None]


@pytest.fixture
def picture(tmp_path) -> tuple[Path, np.ndarray]:
    """A 40x60 RGB PNG of seeded noise and its (H, W, 3) uint8 levels."""
    levels = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(levels).save(path)
    return path, levels


def test_prepare_a_path_is_the_resized_normalised_image(tiny_backbone, picture):
    path, levels = picture
    pixels = torch.from_numpy(levels).permute(2, 0, 1).float() / 255
    prepared = tiny_backbone.prepare(path, bounds=BOUNDS)
    assert prepared.shape == (1, 3, 16, 24)
    assert prepared.device == tiny_backbone.device
    assert torch.equal(prepared, by_hand(pixels))
    assert torch.equal(tiny_backbone.prepare(str(path), bounds=BOUNDS), prepared)


def test_prepare_a_pil_image_and_a_tensor_match_the_file(tiny_backbone, picture):
    path, levels = picture
    expected = by_hand(load_image(path))
    assert torch.equal(tiny_backbone.prepare(Image.fromarray(levels), bounds=BOUNDS), expected)
    assert torch.equal(tiny_backbone.prepare(load_image(path), bounds=BOUNDS), expected)


def test_prepare_grey_pil_image_repeats_the_channel(tiny_backbone):
    grey = Image.fromarray(np.full((8, 8), 51, dtype=np.uint8), mode="L")
    expected = by_hand(torch.full((3, 8, 8), 0.2), None)
    assert torch.allclose(tiny_backbone.prepare(grey), expected, atol=1e-6)


def test_prepare_without_bounds_keeps_the_size(tiny_backbone):
    image = torch.rand(3, 21, 35, generator=torch.Generator().manual_seed(1))
    prepared = tiny_backbone.prepare(image)
    assert prepared.shape == (1, 3, 21, 35)
    assert torch.equal(prepared, by_hand(image, None))


def test_prepare_a_list_batches(tiny_backbone, picture):
    path, levels = picture
    first = load_image(path)
    second = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(2))
    batch = tiny_backbone.prepare([path, second, Image.fromarray(levels)], bounds=BOUNDS)
    assert batch.shape == (3, 3, 16, 24)
    assert torch.equal(batch[0:1], by_hand(first))
    assert torch.equal(batch[1:2], by_hand(second))
    assert torch.equal(batch[2:3], by_hand(first))
    stacked = tiny_backbone.prepare(torch.stack([first, second]), bounds=BOUNDS)
    assert torch.equal(stacked, batch[:2])


def test_prepare_refuses_images_of_different_sizes(tiny_backbone):
    with pytest.raises(ValueError, match="different sizes"):
        tiny_backbone.prepare([torch.rand(3, 40, 60), torch.rand(3, 60, 40)], bounds=BOUNDS)


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.rand(1, 8, 8), r"shape \(3, H, W\)"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "float"),
        (np.zeros((8, 8, 3)), "PIL.Image"),
        ([], "at least one image"),
    ],
)
def test_prepare_names_bad_input(tiny_backbone, image, message):
    with pytest.raises(ValueError, match=message):
        tiny_backbone.prepare(image)


def test_prepare_images_also_gives_pixels_and_original_sizes(picture):
    path, _ = picture
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    inputs, pixels, sizes = prepare_images([path], mean, std, BOUNDS)
    assert sizes == [(40, 60)]
    assert torch.equal(pixels[0], resize_to_fit(load_image(path), BOUNDS))
    assert torch.equal(inputs, (pixels - 0.5) / 0.25)


def test_prepare_moves_the_batch_to_the_backbone_device(picture):
    """PyTorch's ``meta`` device stands in for CUDA (as in tests/test_device.py)."""
    backbone = create_backbone("tiny").to("meta")
    inputs = backbone.prepare(picture[0], bounds=BOUNDS)
    assert inputs.device == torch.device("meta") and inputs.shape == (1, 3, 16, 24)
    prepared = prepare_images(picture[0], backbone.mean, backbone.std, BOUNDS, "meta")
    assert prepared.pixels.device == torch.device("cpu")  # kept for overlays


# -- layering: the models package imports nothing above it ---------------------------------------

PACKAGE = Path(spar.__file__).parent
#: What ``spar.models`` may import of spar: itself and the low layer.
MODELS_MAY_IMPORT = (
    "spar.models",
    "spar.imaging",
    "spar.utils",
    "spar.timing",
    "spar.io",
    "spar.config",
    "spar.deprecations",
    "spar.provenance",
)


def imported_spar_modules(source: str, module: str) -> set[str]:
    """The ``spar`` modules that ``source`` (the text of ``module``) imports, relative imports
    resolved; ``from X import name`` counts both ``X`` and ``X.name`` (``name`` may be one)."""
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if node.module:  # ``from .. import x`` imports ``spar.x``, not ``spar``
                found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "spar" or name.startswith("spar.")}


def outside_the_models_layer(names: set[str]) -> set[str]:
    """Those ``names`` that ``spar.models`` must not import (``spar`` itself counts: its
    ``__init__`` imports the segmenter)."""
    return {
        name
        for name in names
        if not any(name == ok or name.startswith(ok + ".") for ok in MODELS_MAY_IMPORT)
    }


def test_the_layering_check_catches_upward_imports():
    source = (
        "from ..data.images import to_model_input\n"
        "import spar.segmentation\n"
        "def f():\n    from .. import evaluation\n"
        "from ..utils import module_device\nfrom .teacher import x\nfrom ..imaging import y\n"
        "from .. import io\nimport spar\n"
    )
    names = imported_spar_modules(source, "spar.models.base")
    assert outside_the_models_layer(names) == {
        "spar.data.images",
        "spar.data.images.to_model_input",
        "spar.segmentation",
        "spar.evaluation",
        "spar",
    }


def test_models_import_neither_data_nor_anything_above_it():
    problems = {}
    for path in sorted((PACKAGE / "models").glob("*.py")):
        module = f"spar.models.{path.stem}"
        bad = outside_the_models_layer(imported_spar_modules(path.read_text(), module))
        if bad:
            problems[path.name] = sorted(bad)
    assert not problems, f"spar.models imports above its layer: {problems}"
