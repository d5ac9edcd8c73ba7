"""Shared fixtures. Tests never touch the network: the hub is switched off before any import."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per script a test starts): the tiny models gain nothing from
    # intra-op threads, and two workers with two threads each oversubscribe two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from spar.models import create_backbone  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_backbones():
    """``tiny_backbones(name)``: one shared, read-only instance per tiny registry entry (default
    options), built on first use."""
    built = {}

    def shared(name: str):
        if name not in built:
            built[name] = create_backbone(name)
        return built[name]

    return shared


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbones):
    """The embedded default: a tiny random CLIP ViT/16 on the MaskCLIP path (shared, read-only)."""
    return tiny_backbones("tiny")


@pytest.fixture(scope="session")
def tiny_siglip2(tiny_backbones):
    """A tiny random SigLIP2-layout model on the siglip2 path (shared, read-only)."""
    return tiny_backbones("siglip2-tiny")


class PatchAverageBackbone(nn.Module):
    """A purely local synthetic backbone: each output cell is its patch's mean colour.

    Follows the dense-backbone contract by duck typing (it is not a ``DenseBackbone``), and
    records the largest batch it was given.
    """

    def __init__(self, patch_size: int = 16, native_size: int = 64) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = 3
        self.native_size = (native_size, native_size)
        self.mean = (0.0, 0.0, 0.0)
        self.std = (1.0, 1.0, 1.0)
        self.largest_batch = 0
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.largest_batch = max(self.largest_batch, images.shape[0])
        self.calls += 1
        pad_h, pad_w = -images.shape[2] % self.patch_size, -images.shape[3] % self.patch_size
        images = nn.functional.pad(images, (0, pad_w, 0, pad_h))
        return nn.functional.avg_pool2d(images, self.patch_size)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.ones(len(texts), 3)


@pytest.fixture
def patch_average_backbone():
    return PatchAverageBackbone()
