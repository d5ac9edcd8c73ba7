"""The GPU tier: the scripts, the demo and the README's notebook code on an accelerator.

``make test-gpu`` runs it (``pytest -q -m gpu tests/gpu``). Every test here carries the ``gpu``
marker and runs on the device named by the environment variable ``SPAR_TEST_DEVICE``
(default ``cuda``; ``cuda:1`` picks another card). Where that device is absent, e.g. on a machine
without CUDA, every test of the tier is *skipped* with the reason, so the CPU suite
(``make test``, plain ``pytest``) spends nothing on it; ``pytest -ra`` lists the reason.

Checking the tier itself without a GPU: ``SPAR_TEST_DEVICE=cpu pytest -m gpu tests/gpu`` runs
every test of the tier on the CPU (bf16 autocast included, which the CPU supports too), a few
minutes on two cores. It proves the tests and their assertions work; the device-placement bugs
the tier exists for (a tensor left on the CPU next to CUDA ones) only show on a real GPU.

Everything is tiny: the random ``tiny`` backbones, a few generated or bundled images, one epoch.
Tests that have a precision setting run in ``fp32`` and ``bf16`` (the ``precision`` fixture).
"""

import os
from pathlib import Path

import pytest
import torch
from helpers import SMALL_TRAINING, run_script, write_scene_images

DEVICE_VARIABLE = "SPAR_TEST_DEVICE"
DEVICE_NAME = os.environ.get(DEVICE_VARIABLE, "").strip() or "cuda"
TIER = Path(__file__).resolve().parent

# Small training settings shared by every training-like script (about 2 steps per run).
TRAIN_SMALL = (*SMALL_TRAINING, "trainer.epochs=1", "trainer.show_progress=false")


def unavailable_reason(name: str) -> str | None:
    """Why the tier cannot run on device ``name`` here, or ``None`` when it can."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        message = f"{DEVICE_VARIABLE}={name!r} is not a torch device: {error}"
        raise pytest.UsageError(message) from error
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                "CUDA not available: the GPU tier runs on a machine with a GPU (make test-gpu); "
                f"{DEVICE_VARIABLE}=cpu runs it on the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{DEVICE_VARIABLE}={name}: only {torch.cuda.device_count()} CUDA device(s)"
        return None
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        return f"{DEVICE_VARIABLE}={name}: no {device.type} device available"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark every test of this folder ``gpu``; skip them all when the device is absent."""
    tier_items = [item for item in items if TIER in Path(item.path).resolve().parents]
    if not tier_items:
        return
    reason = unavailable_reason(DEVICE_NAME)
    for item in tier_items:
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device_name() -> str:
    """The tier's device as scripts take it (``device=<name>``)."""
    return DEVICE_NAME


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The tier's device, as torch reports a tensor's device (``cuda`` -> ``cuda:0``)."""
    return torch.empty(0, device=DEVICE_NAME).device


def bf16_unsupported(name: str) -> bool:
    device = torch.device(name)
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


@pytest.fixture(params=["fp32", "bf16"])
def precision(request) -> str:
    """Each test that takes it runs twice: float32, then bf16 autocast."""
    if request.param == "bf16" and bf16_unsupported(DEVICE_NAME):
        pytest.skip(f"{DEVICE_NAME} has no bf16 support")
    return request.param


@pytest.fixture(scope="session")
def scene_images(tmp_path_factory) -> Path:
    """Three small generated scenes (read-only: runs write their caches elsewhere)."""
    return write_scene_images(tmp_path_factory.mktemp("scenes"), count=3, size=(120, 160))


def train_overrides(images: Path, work: Path, device: str) -> list[str]:
    """``scripts/train.py`` overrides for a tiny run on ``images``, cache under ``work``."""
    return [
        f"train_images.root={images}",
        f"teacher.cache_dir={work / 'cache'}",
        *TRAIN_SMALL,
        f"device={device}",
    ]


@pytest.fixture
def small_training(tmp_path, scene_images, device_name) -> list[str]:
    """Overrides for a tiny training run on the device, its teacher cache under ``tmp_path``."""
    return train_overrides(scene_images, tmp_path, device_name)


@pytest.fixture(scope="session")
def distilled_checkpoint(tmp_path_factory, scene_images) -> Path:
    """A checkpoint distilled on the tier's device (one short cached run), for the tools that
    load one (demo, eval)."""
    work = tmp_path_factory.mktemp("distilled")
    run_script(
        "train.py",
        *train_overrides(scene_images, work, DEVICE_NAME),
        f"hydra.run.dir={work / 'run'}",
        cwd=work,
    )
    checkpoint = work / "run" / "checkpoints" / "best.safetensors"
    assert checkpoint.is_file()
    return checkpoint
