"""Speed of the student, the teacher and a training step: medians of synchronised timings,
FLOP counts, achieved TFLOP/s against the measured matmul peak, peak memory, bf16 accuracy; the
hours of a training recipe estimated from them (:func:`recipe_estimate`) and profiler tables of
one forward (:func:`profile_forwards`).

``spar-speed`` (:mod:`spar.speed`, config ``spar/configs/speed.yaml``) prints :func:`format_table`
and writes ``speed_results.json`` and ``speed_strides.png`` (and, with ``profile=true``, the
profiler tables).
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ..config import renamed_arguments
from ..distill import OptimSettings, StudentOptimizer, teacher_map
from ..io import atomic_save_image
from ..models import build_teacher, compile_backbone, compile_report
from ..models.base import TrainableBlocks
from ..models.compiling import CompileSetting, describe_compile_report
from ..refine import build_stages
from ..segmentation import OpenVocabSegmenter
from ..timing import synchronize, time_call
from ..utils import Autocast, autocast_dtype, autocast_for, configure_matmul_precision

GPU_SIZES = ((448, 448), (672, 896), (1024, 2048))
CPU_SIZES = ((224, 224), (448, 448), (448, 896))
DEFAULT_TRAINABLE_BLOCKS = "last-2"  # the training configs' backbone.trainable_blocks


def peak_memory(function: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device while ``function()`` runs (``None`` on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def count_flops(function: Callable[[], Any]) -> int:
    """FLOPs of ``function()`` (matmuls, convolutions, attention) by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """Measured dense matmul throughput (TFLOP/s): square matmuls of 8192 on GPU, 1024 on CPU."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / timing["median_s"] / 1e12


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float32."""
    value, reference = value.float(), reference.float()
    return (
        torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference)
    ).item()


def _images(batch: int, size: Sequence[int], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, *size, generator=generator).to(device)


def rates_until_out_of_memory(
    batch_sizes: Sequence[int], measure: Callable[[int], float]
) -> dict[int, float]:
    """``{batch: measure(batch)}`` (images/s) for growing batches, stopping at the first that
    runs out of device memory."""
    rates = {}
    for batch in batch_sizes:
        try:
            rates[batch] = measure(batch)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not isinstance(error, torch.OutOfMemoryError) and "out of memory" not in str(error):
                raise
            torch.cuda.empty_cache()
            break
    return rates


def time_student(
    backbone: nn.Module,
    size: Sequence[int],
    device: torch.device,
    precision: str,
    batch_sizes: Sequence[int],
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Single-pass latency at batch 1 and the best throughput over ``batch_sizes``."""
    autocast = autocast_for(precision, device)

    def run(images):
        with torch.no_grad(), autocast():
            return backbone(images)

    one = _images(1, size, device)
    latency = time_call(lambda: run(one), device, warmup, repeats)
    flops = count_flops(lambda: run(one))

    def throughput(batch: int) -> float:
        images = _images(batch, size, device)
        return batch / time_call(lambda: run(images), device, 1, max(2, repeats // 2))["median_s"]

    rates = rates_until_out_of_memory([b for b in batch_sizes if b != 1], throughput)
    rates[1] = 1 / latency["median_s"]
    best_batch = max(rates, key=rates.get)
    best = {"batch": best_batch, "images_per_second": rates[best_batch]}
    return {
        "latency_s": latency["median_s"],
        "flops": flops,
        "tflops_batch1": flops / latency["median_s"] / 1e12,
        "best_batch": best["batch"],
        "best_images_per_second": best["images_per_second"],
        "tflops_best": flops * best["images_per_second"] / 1e12,
        "peak_memory_bytes": peak_memory(lambda: run(one), device),
    }


def time_teacher(
    backbone: nn.Module,
    size: Sequence[int],
    teacher_settings: Mapping[str, Any],
    device: torch.device,
    precision: str,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Sliding-window teacher time per image and its FLOPs (``teacher_settings`` as for
    :func:`spar.models.build_teacher`), built at ``precision`` as training and evaluation build
    it (a low-precision weight copy)."""
    teacher = build_teacher(backbone, teacher_settings, precision)
    stride = teacher.stride[0]
    autocast = autocast_for(precision, device)
    image = _images(1, size, device)

    def run():
        with torch.no_grad(), autocast():
            return teacher(image)

    timing = time_call(run, device, warmup, repeats)
    flops = count_flops(run)
    return {
        "stride": stride,
        "windows": teacher.num_windows(*size),
        "seconds": timing["median_s"],
        "flops": flops,
        "tflops": flops / timing["median_s"] / 1e12,
        "peak_memory_bytes": peak_memory(run, device),
    }


def time_training_step(
    backbone: nn.Module,
    size: Sequence[int],
    teacher_settings: Mapping[str, Any],
    device: torch.device,
    precision: str,
    batch_sizes: Sequence[int],
    warmup: int,
    repeats: int,
    trainable_blocks: TrainableBlocks | None = None,
) -> dict[str, Any]:
    """Images/s of the distillation step that training runs (``StudentOptimizer.train_step``:
    forward, MSE, backward, AdamW) with cached targets at each batch size (same-size views, as
    size buckets give), and with the online teacher (``teacher_map`` first).

    ``trainable_blocks``: the blocks trained (``"last-N"``, ...); ``None`` keeps those the
    backbone was created with (``create_backbone(..., trainable_blocks=...)``, i.e. the config's
    ``backbone.trainable_blocks``), or the training default ``"last-2"`` if it has none.
    """
    student = copy.deepcopy(backbone).train()
    trained = trained_blocks(student)
    if trainable_blocks is not None:
        trained = student.set_trainable_blocks(trainable_blocks)
    elif not trained:
        trained = student.set_trainable_blocks(DEFAULT_TRAINABLE_BLOCKS)
    teacher = build_teacher(backbone, teacher_settings, precision)
    autocast = autocast_for(precision, device)
    # A tiny learning rate keeps the student near its start over the timed steps; the constant
    # schedule makes the number of steps irrelevant.
    update = StudentOptimizer(
        student, OptimSettings(lr=1e-9), device=device, total_steps=1, precision=precision
    )
    one = _images(1, size, device)
    target = teacher_map(teacher, one[0], autocast)[None]

    def cached_rate(batch: int) -> float:
        images = _images(batch, size, device)
        targets = target.expand(batch, -1, -1, -1).contiguous()
        timing = time_call(lambda: update.train_step(images, targets), device, warmup, repeats)
        return batch / timing["median_s"]

    cached = rates_until_out_of_memory(batch_sizes, cached_rate)

    def online_step():
        update.train_step(one, teacher_map(teacher, one[0], autocast)[None])

    online = time_call(online_step, device, 1, max(2, repeats // 2))
    return {
        "trainable_blocks": trained,
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "cached_images_per_second": {str(b): rate for b, rate in cached.items()},
        "cached_speedup_over_batch1": max(cached.values()) / cached[1] if cached else None,
        "online_images_per_second": 1 / online["median_s"],
        "peak_memory_bytes": peak_memory(lambda: update.train_step(one, target), device),
    }


def trained_blocks(backbone: nn.Module) -> list[int]:
    """Indices of the vision blocks with a parameter that requires grad."""
    return [
        index
        for index, block in enumerate(backbone.blocks)
        if any(p.requires_grad for p in block.parameters())
    ]


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions without TF32 inside the block, the previous settings
    after it."""
    restore = configure_matmul_precision(False)
    try:
        yield
    finally:
        restore()


def low_precision_error(
    backbone: nn.Module,
    size: Sequence[int],
    teacher_settings: Mapping[str, Any],
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Relative error of student and teacher maps at ``precision`` against full float32 (TF32
    off for the reference); the teacher at ``precision`` is the one training and evaluation
    build (a low-precision weight copy)."""
    reference = build_teacher(backbone, teacher_settings)
    teacher = build_teacher(backbone, teacher_settings, precision)
    image = _images(1, size, device)
    autocast = autocast_for(precision, device)
    with torch.no_grad():
        with full_float32():
            student_ref, teacher_ref = backbone(image).float(), reference(image)
        with autocast():
            student, stitched = backbone(image).float(), teacher(image).float()
    return {
        "student_relative_error": relative_error(student, student_ref),
        "teacher_relative_error": relative_error(stitched, teacher_ref),
    }


def device_description(device: torch.device) -> dict[str, Any]:
    """Device, software versions and whether float32 matmuls run in TF32 (``tf32``: allowed by
    :func:`spar.utils.configure_matmul_precision` on a CUDA GPU that has it)."""
    info = {"device": str(device), "torch": torch.__version__, "machine": platform.machine()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32"] = (
            torch.cuda.get_device_capability(device) >= (8, 0)
            and torch.backends.cuda.matmul.fp32_precision == "tf32"
        )
    else:
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
        info["tf32"] = False
    return info


def resolve_sizes(sizes: Sequence[Sequence[int]] | None, device: torch.device) -> list[tuple]:
    """``sizes`` as (H, W) tuples; ``None``: :data:`GPU_SIZES` on CUDA, :data:`CPU_SIZES`
    elsewhere. The training step is measured at the middle one unless told otherwise."""
    return [tuple(s) for s in (sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES))]


def _sweep_at(size: tuple, stride_sweep: Sequence[int], train_size: tuple, stride: int) -> list:
    """The strides timed at ``size``: ``stride_sweep``, plus the training ``stride`` at the
    training size (the teacher cache fill of :func:`recipe_estimate`) when the sweep lacks it."""
    strides = list(stride_sweep)
    if size == train_size and stride not in strides:
        strides.append(stride)
    return strides


@renamed_arguments()
def measure_speed(
    backbone: nn.Module,
    device: torch.device,
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    stride_sweep: Sequence[int] = (224, 112, 56, 24),
    teacher: Mapping[str, Any] | None = None,
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    train_batch_sizes: Sequence[int] = (1, 2, 4, 8),
    train_size: Sequence[int] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    compile: CompileSetting = False,
    trainable_blocks: TrainableBlocks | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every measurement for one backbone on one device; see the module docstring.

    ``teacher`` holds the teacher's settings (``configs/teacher``: window, stride, batch_size);
    its stride is replaced by each of ``stride_sweep`` for the teacher table, and used as it is
    (default 24) for the training step and the low-precision error. Those two run at
    ``train_size``, one of ``sizes`` (default the middle one), where the teacher is also timed at
    the training stride if ``stride_sweep`` lacks it. ``compile`` times a compiled copy of the
    student (:func:`spar.models.compile_backbone`; the teacher and the training step stay
    eager) and reports its first-call (compile) times under ``"compile"``. The training step
    trains ``trainable_blocks`` (see :func:`time_training_step`; ``None``: as the backbone was
    created, which ``spar-speed`` does from ``backbone.trainable_blocks``).
    """
    teacher = {"stride": 24, **(teacher or {})}
    sizes = resolve_sizes(sizes, device)
    train_size = tuple(train_size) if train_size else sizes[len(sizes) // 2]
    if train_size not in sizes:
        raise ValueError(f"train_size {list(train_size)} is not one of sizes {sizes}")
    backbone = backbone.to(device).eval()
    student = compile_backbone(copy.deepcopy(backbone), compile) if compile else backbone
    results: dict[str, Any] = {"device": device_description(device), "precisions": {}}
    for precision in precisions:
        dtype = autocast_dtype(precision, device) or torch.float32
        section: dict[str, Any] = {
            "matmul_peak_tflops": matmul_peak_tflops(device, dtype),
            "sizes": {},
        }
        for size in sizes:
            name = f"{size[0]}x{size[1]}"
            log(f"[{precision}] {name}: student")
            student_row = time_student(
                student, size, device, precision, batch_sizes, warmup, repeats
            )
            teacher_rows = []
            for stride in _sweep_at(size, stride_sweep, train_size, teacher["stride"]):
                log(f"[{precision}] {name}: teacher stride {stride}")
                settings = {**teacher, "stride": stride}
                teacher_rows.append(
                    time_teacher(backbone, size, settings, device, precision, 1, repeats)
                )
            row = {"student": student_row, "teacher": teacher_rows}
            for entry in row["teacher"]:
                entry["time_ratio"] = entry["seconds"] / row["student"]["latency_s"]
                entry["flop_ratio"] = entry["flops"] / row["student"]["flops"]
            section["sizes"][name] = row
        log(f"[{precision}] training step at {train_size[0]}x{train_size[1]}")
        section["training"] = {
            "size": list(train_size),
            "stride": teacher["stride"],
            **time_training_step(
                backbone,
                train_size,
                teacher,
                device,
                precision,
                train_batch_sizes,
                1,
                repeats,
                trainable_blocks,
            ),
        }
        if precision != "fp32":
            section["accuracy"] = low_precision_error(
                backbone, train_size, teacher, device, precision
            )
        results["precisions"][precision] = section
    results["compile"] = compile_report(student)
    return results


def recipe_estimate(
    results: Mapping[str, Any], images: int, epochs: int, precision: str
) -> dict[str, Any]:
    """Hours of a training recipe on the measured device, from the rates of ``results`` (as
    :func:`measure_speed` returns) at ``precision``: filling the teacher cache for ``images``
    views (teacher seconds per image at the training stride and size) plus ``epochs`` epochs of
    cached training (the best cached images/s); and, for comparison, ``epochs`` epochs with the
    online teacher. Every view counts at the training-step size; data loading, disk and the
    held-out checks are not included.
    """
    section = results["precisions"][precision]
    training = section["training"]
    size, stride = training["size"], training["stride"]
    name = f"{size[0]}x{size[1]}"
    rows = [t for t in section["sizes"].get(name, {}).get("teacher", []) if t["stride"] == stride]
    if not rows:
        raise ValueError(f"no teacher measurement at stride {stride} and {name} ({precision})")
    cached = training["cached_images_per_second"]
    batch = max(cached, key=cached.get)
    cache_fill = images * rows[0]["seconds"] / 3600
    cached_training = epochs * images / cached[batch] / 3600
    return {
        "precision": precision,
        "images": images,
        "epochs": epochs,
        "size": list(size),
        "stride": stride,
        "teacher_seconds_per_image": rows[0]["seconds"],
        "cached_batch": int(batch),
        "cached_images_per_second": cached[batch],
        "cache_fill_hours": cache_fill,
        "cached_training_hours": cached_training,
        "total_hours": cache_fill + cached_training,
        "online_hours": epochs * images / training["online_images_per_second"] / 3600,
    }


def _inference(model: Callable, images: torch.Tensor, autocast: Autocast) -> Callable[[], Any]:
    """``model(images)`` without gradients under ``autocast``, as a function of no arguments."""

    def run():
        with torch.no_grad(), autocast():
            return model(images)

    return run


def profile_table(
    function: Callable[[], Any], device: torch.device, sort_by: str | None = None
) -> str:
    """``torch.profiler`` operator table of one call of ``function()`` (after one call to warm
    up): the 30 rows with the most ``sort_by`` (default ``cuda_time_total`` on a CUDA device,
    ``cpu_time_total`` elsewhere)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    function()
    synchronize(device)
    with profile(activities=activities) as profiler:
        function()
        synchronize(device)
    default = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by or default, row_limit=30)


def profile_forwards(
    backbone: nn.Module,
    device: torch.device,
    size: Sequence[int],
    teacher_settings: Mapping[str, Any],
    precisions: Sequence[str],
) -> dict[str, str]:
    """Profiler tables (:func:`profile_table`) of one student forward at batch 1 and one
    sliding-window teacher forward (``teacher_settings`` as for
    :func:`spar.models.build_teacher`) at ``size``, one table per precision: ``{file name:
    text}``, named ``profile_student_<H>x<W>.txt`` and ``profile_teacher_<H>x<W>_s<stride>.txt``.
    """
    backbone = backbone.to(device).eval()
    image = _images(1, size, device)
    name = f"{size[0]}x{size[1]}"
    where = device_description(device)["name"]
    tables: dict[str, list[str]] = {}
    for precision in precisions:
        # The teacher as time_teacher times it: built at the precision (a low-precision copy of
        # the weights, autocast off inside), not the float32 teacher under autocast.
        teacher = build_teacher(backbone, teacher_settings, precision)
        stride, windows = teacher.stride[0], teacher.num_windows(*size)
        forwards = {
            f"profile_student_{name}.txt": ("student, batch 1", backbone),
            f"profile_teacher_{name}_s{stride}.txt": (
                f"teacher, stride {stride}, {windows} windows, "
                f"{teacher.batch_size} windows a forward",
                teacher,
            ),
        }
        for file, (what, model) in forwards.items():
            tables.setdefault(file, []).append(
                f"== {what}, {name}, {precision}, {where}: one forward after one warm-up\n"
                + profile_table(_inference(model, image, autocast_for(precision, device)), device)
            )
    return {file: "\n\n".join(parts) + "\n" for file, parts in tables.items()}


def _percent(tflops: float, peak: float) -> str:
    return f"{100 * tflops / peak:.0f}%" if peak else "-"


def _memory(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """The benchmark as plain-text tables (one block per precision)."""
    device = results["device"]
    lines = [f"device: {device['name']} ({device['device']}), torch {device['torch']}"]
    if results.get("compile"):
        lines.append(f"student {describe_compile_report(results['compile'])}")
    for precision, section in results["precisions"].items():
        peak = section["matmul_peak_tflops"]
        label = f"{precision} (TF32)" if precision == "fp32" and device.get("tf32") else precision
        lines += ["", f"== {label}: measured matmul peak {peak:.2f} TFLOP/s =="]
        lines.append(
            f"{'student':<12}{'latency ms':>11}{'TFLOP/s':>9}{'%peak':>7}{'best batch':>11}"
            f"{'img/s':>9}{'TFLOP/s':>9}{'%peak':>7}{'mem GiB':>9}"
        )
        for name, row in section["sizes"].items():
            s = row["student"]
            lines.append(
                f"{name:<12}{1000 * s['latency_s']:>11.2f}{s['tflops_batch1']:>9.2f}"
                f"{_percent(s['tflops_batch1'], peak):>7}{s['best_batch']:>11}"
                f"{s['best_images_per_second']:>9.1f}{s['tflops_best']:>9.2f}"
                f"{_percent(s['tflops_best'], peak):>7}{_memory(s['peak_memory_bytes']):>9}"
            )
        lines.append(
            f"{'teacher':<12}{'stride':>7}{'windows':>9}{'s/img':>9}{'x student':>11}"
            f"{'x FLOPs':>9}{'TFLOP/s':>9}{'%peak':>7}{'mem GiB':>9}"
        )
        for name, row in section["sizes"].items():
            for t in row["teacher"]:
                lines.append(
                    f"{name:<12}{t['stride']:>7}{t['windows']:>9}{t['seconds']:>9.3f}"
                    f"{t['time_ratio']:>11.1f}{t['flop_ratio']:>9.1f}{t['tflops']:>9.2f}"
                    f"{_percent(t['tflops'], peak):>7}{_memory(t['peak_memory_bytes']):>9}"
                )
        training = section["training"]
        cached = ", ".join(
            f"batch {b}: {rate:.1f}" for b, rate in training["cached_images_per_second"].items()
        )
        lines.append(
            f"training step at {training['size'][0]}x{training['size'][1]} (img/s): cached "
            f"[{cached}] ({training['cached_speedup_over_batch1']:.1f}x batch 1); online teacher "
            f"{training['online_images_per_second']:.2f}"
        )
        if "accuracy" in section:
            accuracy = section["accuracy"]
            lines.append(
                f"relative error vs fp32: student {accuracy['student_relative_error']:.2e}, "
                f"teacher {accuracy['teacher_relative_error']:.2e}"
            )
        if precision in results.get("recipe", {}):
            lines.append(format_recipe(results["recipe"][precision]))
    return "\n".join(lines)


def format_recipe(recipe: Mapping[str, Any]) -> str:
    """One line for a :func:`recipe_estimate`."""
    size = f"{recipe['size'][0]}x{recipe['size'][1]}"
    return (
        f"recipe estimate, {recipe['images']} images at {size} x {recipe['epochs']} epochs: "
        f"teacher cache {recipe['cache_fill_hours']:.2f} h (stride {recipe['stride']}, "
        f"{recipe['teacher_seconds_per_image']:.3f} s/img) + cached training "
        f"{recipe['cached_training_hours']:.2f} h (batch {recipe['cached_batch']}, "
        f"{recipe['cached_images_per_second']:.1f} img/s) = {recipe['total_hours']:.2f} h; "
        f"online teacher instead {recipe['online_hours']:.2f} h"
    )


def plot_strides(results: dict[str, Any], path: str, precision: str | None = None) -> None:
    """Teacher seconds per image against stride (log scale), one line per size, with the
    student's latency as a dashed line of the same colour; written as a PNG."""
    precision = precision or next(iter(results["precisions"]))
    sizes = results["precisions"][precision]["sizes"]
    width, height, margin = 720, 440, 70
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    strides = sorted({t["stride"] for row in sizes.values() for t in row["teacher"]}, reverse=True)
    values = [t["seconds"] for row in sizes.values() for t in row["teacher"]]
    values += [row["student"]["latency_s"] for row in sizes.values()]
    low, high = math.log10(min(values)) - 0.1, math.log10(max(values)) + 0.1

    def x_of(stride):
        return margin + strides.index(stride) * (width - 2 * margin) / max(1, len(strides) - 1)

    def y_of(seconds):
        return height - margin - (math.log10(seconds) - low) / (high - low) * (height - 2 * margin)

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for stride in strides:
        draw.text((x_of(stride) - 8, height - margin + 6), str(stride), fill="black", font=font)
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        if low <= exponent <= high:
            y = y_of(10**exponent)
            draw.line([margin - 4, y, margin, y], fill="black")
            draw.text((6, y - 6), f"1e{exponent} s", fill="black", font=font)
    draw.text((width // 2 - 40, height - margin + 22), "stride (px)", fill="black", font=font)
    title = f"teacher seconds per image vs stride ({precision}); dashed: student single pass"
    draw.text((margin, 20), title, fill="black", font=font)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for index, (name, row) in enumerate(sizes.items()):
        colour = colours[index % len(colours)]
        points = [(x_of(t["stride"]), y_of(t["seconds"])) for t in row["teacher"]]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        y = y_of(row["student"]["latency_s"])
        for x in range(margin, width - margin, 12):
            draw.line([x, y, x + 6, y], fill=colour, width=2)
        draw.text((width - margin + 4, points[-1][1] - 6), name, fill=colour, font=font)
    atomic_save_image(path, canvas)


# -- refinement stages ---------------------------------------------------------------------------


def stage_combinations(
    refine: Mapping[str, Any] | None, upsample: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """The stage settings timed by :func:`measure_stages`: the plain segmenter (``bilinear``),
    then ``refine`` alone, ``upsample`` alone and both, for those that are switched on.

    Returns ``{row label: {"refine": ..., "upsample": ...}}`` (configs/refine, configs/upsample).
    """
    plain_refine, plain_upsample = {"name": "none"}, {"name": "bilinear"}
    rows = {"bilinear": {"refine": plain_refine, "upsample": plain_upsample}}
    refine_on = bool(refine) and refine.get("name", "none") != "none"
    upsample_on = bool(upsample) and upsample.get("name", "bilinear") != "bilinear"
    if refine_on:
        rows[refine["name"]] = {"refine": refine, "upsample": plain_upsample}
    if upsample_on:
        rows[upsample["name"]] = {"refine": plain_refine, "upsample": upsample}
    if refine_on and upsample_on:
        rows[f"{refine['name']}+{upsample['name']}"] = {"refine": refine, "upsample": upsample}
    return rows


def measure_stages(
    backbone: nn.Module,
    device: torch.device,
    stages: Mapping[str, Mapping[str, Any]],
    *,
    sizes: Sequence[Sequence[int]] | None = None,
    precisions: Sequence[str] = ("fp32",),
    num_classes: int = 21,
    warmup: int = 1,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Seconds and peak memory of the segmenter's scores (``name_logits``, one image, after the
    text embeddings are built) with each refinement-stage setting of ``stages`` (e.g.
    :func:`stage_combinations`), at every size, with ``num_classes`` class names.

    Returns ``{precision: {row label: {"HxW": {"seconds", "peak_memory_bytes"}}}}``
    (``peak_memory_bytes`` is ``None`` on CPU).
    """
    backbone = backbone.to(device).eval()
    classes = [f"class {index}" for index in range(num_classes)]
    results: dict[str, Any] = {}
    for precision in precisions:
        autocast = autocast_for(precision, device)
        section = results.setdefault(precision, {})
        for label, settings in stages.items():
            segmenter = OpenVocabSegmenter.from_backbone(
                backbone, classes, templates="single", **build_stages(settings, device)
            )
            rows = section.setdefault(label, {})
            for size in resolve_sizes(sizes, device):
                log(f"[{precision}] {size[0]}x{size[1]}: stage {label}")
                run = _inference(segmenter.name_logits, _images(1, size, device), autocast)
                timing = time_call(run, device, warmup, repeats)
                rows[f"{size[0]}x{size[1]}"] = {
                    "seconds": timing["median_s"],
                    "peak_memory_bytes": peak_memory(run, device),
                }
    return results


def format_stage_table(results: Mapping[str, Any]) -> str:
    """:func:`measure_stages` results as one block per precision: a row per stage, seconds and
    peak memory (GiB) per size."""
    lines = []
    for precision, section in results.items():
        sizes = list(next(iter(section.values()), {}))
        lines += ["", f"== refinement stages, {precision}: s/img (peak GiB) =="]
        lines.append(f"{'stage':<22}" + "".join(f"{size:>22}" for size in sizes))
        for label, rows in section.items():
            cells = [
                f"{rows[s]['seconds']:.3f} ({_memory(rows[s]['peak_memory_bytes'])})" for s in sizes
            ]
            lines.append(f"{label:<22}" + "".join(f"{cell:>22}" for cell in cells))
    return "\n".join(lines)
