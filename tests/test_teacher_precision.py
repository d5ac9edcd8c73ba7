"""Teacher efficiency: the low-precision weight copy, window batches sized from free memory (the
config value as a cap), and the compiled window forward."""

import pytest
import torch
from helpers import CONFIGS, train_config
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from spar.distill import prepare
from spar.models import SlidingWindowTeacher, build_teacher, create_backbone
from spar.models import teacher as teacher_module
from spar.models.teacher import pad_with_last, window_batch_size

TINY_NAMES = ["tiny", "siglip2-tiny", "dinov3txt-tiny"]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def copy_events(function) -> int:
    """``aten::copy_`` and ``aten::_to_copy`` events the CPU profiler records in ``function()``."""
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        function()
    return sum(event.name in ("aten::copy_", "aten::_to_copy") for event in recorded.events())


@pytest.mark.parametrize("name", TINY_NAMES)
def test_bf16_teacher_runs_a_bf16_copy_within_bf16_tolerance(tiny_backbones, name):
    backbone = tiny_backbones(name)
    images = torch.randn(2, 3, 96, 128)
    reference = SlidingWindowTeacher(backbone, window=64, stride=24, batch_size=5)(images)
    teacher = SlidingWindowTeacher(
        backbone, window=64, stride=24, batch_size=5, dtype=torch.bfloat16
    )
    stitched = teacher(images)
    assert stitched.dtype == torch.float32 and stitched.shape == reference.shape
    assert relative_error(stitched, reference) < 2e-2
    assert teacher.window_model is not backbone
    assert {p.dtype for p in teacher.window_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in teacher.window_model.parameters())


def test_bf16_teacher_keeps_the_text_tower_and_normalisation_of_the_backbone(tiny_backbone):
    texts = ["a photo of a cat", "road"]
    expected = tiny_backbone.encode_text(texts)
    teacher = SlidingWindowTeacher(tiny_backbone, dtype=torch.bfloat16)
    encoded = teacher.encode_text(texts)
    assert encoded.dtype == torch.float32 and torch.equal(encoded, expected)
    assert (teacher.mean, teacher.std) == (tiny_backbone.mean, tiny_backbone.std)


def test_bf16_teacher_casts_far_less_than_an_autocast_one(tiny_backbone):
    images = torch.randn(1, 3, 96, 128)
    fp32 = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, batch_size=6)
    bf16 = SlidingWindowTeacher(
        tiny_backbone, window=64, stride=24, batch_size=6, dtype=torch.bfloat16
    )

    def autocast_forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32(images)

    autocast_copies, bf16_copies = copy_events(autocast_forward), copy_events(lambda: bf16(images))
    assert 2 * bf16_copies < autocast_copies, (bf16_copies, autocast_copies)


def test_a_surrounding_autocast_is_switched_off_for_a_low_precision_teacher(tiny_siglip2):
    images = torch.randn(1, 3, 80, 112)
    teacher = SlidingWindowTeacher(tiny_siglip2, window=64, stride=24, dtype=torch.bfloat16)
    plain = teacher(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(teacher(images), plain)


def test_build_teacher_resolves_the_precision_on_the_backbone_device(tiny_backbone):
    settings = {"window": 64, "stride": 24}
    images = torch.randn(1, 3, 80, 112)
    for precision in ("fp32", "auto"):  # auto is float32 on the CPU
        teacher = build_teacher(tiny_backbone, settings, precision)
        assert teacher.dtype is None and teacher.window_model is tiny_backbone
        assert torch.equal(teacher(images), SlidingWindowTeacher(tiny_backbone, 64, 24)(images))
    assert build_teacher(tiny_backbone, settings).window_model is tiny_backbone  # fp32 default
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        teacher = build_teacher(tiny_backbone, settings, precision)
        assert teacher.dtype == dtype
        assert {p.dtype for p in teacher.window_model.parameters()} == {dtype}
    with pytest.raises(ValueError, match="precision"):
        build_teacher(tiny_backbone, settings, "int8")


def test_build_teacher_can_convert_a_backbone_it_alone_uses_in_place():
    frozen = create_backbone("tiny").requires_grad_(False).eval()
    teacher = build_teacher(frozen, {"window": 64}, "bf16", copy_backbone=False)
    assert teacher.window_model is frozen and teacher.backbone is frozen
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert teacher(torch.randn(1, 3, 80, 112)).dtype == torch.float32


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_training_teacher_takes_the_training_precision_and_leaves_the_student(
    tmp_path, precision, dtype
):
    setup = prepare(train_config(tmp_path, f"trainer.precision={precision}"))
    teacher = setup.targets.teacher
    assert {p.dtype for p in teacher.window_model.parameters()} == {dtype}
    assert teacher.window_model is teacher.backbone, "the frozen copy is converted, not copied"
    assert {p.dtype for p in setup.student.parameters()} == {torch.float32}


def test_the_config_gives_the_cap_and_the_compile_switch(tiny_backbone):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        settings = compose("teacher/sliding_window").teacher  # as Hydra composes it
    teacher = build_teacher(tiny_backbone, settings)
    assert (teacher.batch_size, teacher.compile_mode) == (32, False)


@pytest.mark.parametrize(
    ("cap", "free", "per_window", "expected"),
    [
        (32, 10_000, 100, 32),  # the cap binds
        (32, 1_000, 100, 8),  # 0.8 * 1000 // 100
        (32, 50, 100, 1),  # always at least one window
        (32, 10_000, 0, 32),  # nothing measured: the cap
    ],
)
def test_window_batch_size_is_the_cap_or_what_fits(cap, free, per_window, expected):
    assert window_batch_size(cap, free, per_window) == expected


def test_pad_with_last_repeats_the_last_window():
    ids = torch.tensor([4, 7, 9])
    assert torch.equal(pad_with_last(ids, 5), torch.tensor([4, 7, 9, 9, 9]))
    assert pad_with_last(ids, 3) is ids


def test_on_cuda_the_chunk_follows_free_memory_and_only_shrinks(tiny_backbone, monkeypatch):
    """The sizing rule of the CUDA branch, with the free memory given (no GPU needed)."""
    teacher = SlidingWindowTeacher(tiny_backbone, batch_size=32)
    teacher._window_bytes[(64, 64)] = 100
    cuda, sizes = torch.device("cuda"), []
    for free in (100_000, 1_000, 100_000):
        monkeypatch.setattr(teacher_module, "cuda_free_bytes", lambda device, free=free: free)
        sizes.append(teacher._chunk_size((64, 64), cuda))
    assert sizes == [32, 8, 8]
    assert teacher._chunk_size((64, 64), torch.device("cpu")) == 32


@pytest.mark.parametrize(
    "kwargs",
    [{"dtype": torch.int8}, {"dtype": "bf16"}, {"compile": "fast"}, {"compile": 1.0}],
)
def test_bad_precision_and_compile_settings_are_rejected(patch_average_backbone, kwargs):
    with pytest.raises(ValueError):
        SlidingWindowTeacher(patch_average_backbone, **kwargs)


def test_compiled_window_forward_equals_eager(tiny_backbone):
    """Inductor on the CPU; 4 windows in chunks of 3, so the last chunk is padded."""
    images = torch.randn(1, 3, 96, 96)
    eager = SlidingWindowTeacher(tiny_backbone, window=64, stride=32, batch_size=3)
    compiled = SlidingWindowTeacher(tiny_backbone, window=64, stride=32, batch_size=3, compile=True)
    assert compiled.num_windows(96, 96) == 4
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)
