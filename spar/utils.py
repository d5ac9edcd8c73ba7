"""Small helpers shared by scripts and library code."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

Autocast = Callable[[], contextlib.AbstractContextManager]
"""A factory of autocast contexts, as :func:`autocast_for` returns (``contextlib.nullcontext``:
full float32)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else CPU; otherwise ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def module_device(module: object, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``module``'s first parameter (or buffer).

    ``default`` for objects that hold no tensors, e.g. duck-typed backbones or plain callables.
    """
    for tensors in ("parameters", "buffers"):
        for tensor in getattr(module, tensors, lambda: ())():
            return tensor.device
    return torch.device(default)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: full float32).

    ``auto`` is bf16 on a CUDA device that supports it and float32 elsewhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_for(precision: str, device: torch.device) -> Autocast:
    """A factory of autocast contexts for ``precision`` on ``device`` (no-op for float32).

    Training (student and teacher), held-out checks, the teacher cache, evaluation and the
    benchmark all build their autocast here.
    """
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def configure_matmul_precision(tf32: bool) -> Callable[[], None]:
    """Let float32 matrix multiplications and cuDNN convolutions use TensorFloat-32 (``tf32``),
    or keep them in full float32; returns a function that restores the previous settings.

    Matmuls go through ``torch.set_float32_matmul_precision("high" | "highest")``, the call torch
    recommends (it keeps the per-backend ``fp32_precision`` flags and their getters consistent),
    convolutions through ``torch.backends.cudnn.conv.fp32_precision`` (``"tf32"`` | ``"ieee"``).
    Only CUDA GPUs with TF32 (Ampere or newer) change; the flags exist, unused, without CUDA.
    Process-wide: the scripts call it at start (``tf32`` in their configs); library functions
    leave the setting as they find it (``spar.tools.speed`` turns TF32 off only around its float32
    reference, then restores it).
    """
    matmul = torch.get_float32_matmul_precision()
    convolution = torch.backends.cudnn.conv.fp32_precision
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"

    def restore() -> None:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.conv.fp32_precision = convolution

    return restore


class NonFiniteError(FloatingPointError):
    """A tensor that must be finite (teacher map, loss, weights to save) holds NaN or inf."""


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``tensor`` if all its values are finite, else raise :class:`NonFiniteError`.

    ``what`` names the tensor in the message, e.g. ``"teacher map of a.jpg at step 12"``.
    """
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise NonFiniteError(
            f"{what} holds {bad} NaN/inf values out of {finite.numel()}; stopping here so that "
            "nothing non-finite is trained on or saved (finished checkpoints and cache entries "
            "are kept)"
        )
    return tensor


def check_finite_before_saving(state: Mapping[str, torch.Tensor], destination: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating-point tensor of ``state``
    (``name -> tensor``, e.g. a state dict) that holds NaN or inf, before anything is written to
    ``destination`` (a file or folder, with e.g. ``" at step 12"``): nothing non-finite replaces
    a finite checkpoint. Integer tensors (counters, indices) cannot be non-finite."""
    for name, tensor in state.items():
        if tensor.is_floating_point():
            check_finite(tensor, f"parameter {name}, to be saved in {destination},")


def pass_through(item: Any) -> Any:
    """Collate for ``DataLoader(batch_size=None)``: items are used one at a time, as they are.

    A named function rather than a lambda, so that worker processes can pickle it.
    """
    return item
