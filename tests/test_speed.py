"""Speed measurement: helpers and the script on CPU."""

import json
import time

import pytest
import torch
from helpers import run_script
from torch import nn

from spar.models import create_backbone
from spar.timing import time_call
from spar.tools.speed import (
    count_flops,
    format_recipe,
    format_table,
    full_float32,
    measure_speed,
    profile_table,
    recipe_estimate,
    relative_error,
)
from spar.utils import configure_matmul_precision


def test_flop_count_of_a_linear_layer():
    layer = nn.Linear(32, 16)
    assert count_flops(lambda: layer(torch.randn(8, 32))) == 2 * 8 * 32 * 16


def test_relative_error_and_timing():
    reference = torch.ones(10)
    assert relative_error(reference * 1.01, reference) == pytest.approx(0.01, rel=1e-4)
    timing = time_call(lambda: time.sleep(0.02), torch.device("cpu"), warmup=0, repeats=3)
    assert 0.02 <= timing["min_s"] and timing["median_s"] < 1.0  # seconds, one call each


def test_benchmark_counts_windows_and_flop_ratios(tiny_backbone):
    results = measure_speed(
        tiny_backbone,
        torch.device("cpu"),
        sizes=[[224, 448]],
        stride_sweep=[224, 24],
        batch_sizes=[1, 2],
        train_batch_sizes=[1, 2],
        warmup=0,
        repeats=2,
        log=lambda message: None,
    )
    section = results["precisions"]["fp32"]
    row = section["sizes"]["224x448"]
    assert [t["windows"] for t in row["teacher"]] == [2, 11]
    # 11 windows of 224x224 against one pass over 224x448 (twice the tokens, quadratic attention)
    assert 5 < row["teacher"][1]["flop_ratio"] < 11
    assert row["student"]["flops"] > 0 and section["matmul_peak_tflops"] > 0
    assert set(section["training"]["cached_images_per_second"]) == {"1", "2"}
    assert "teacher" in format_table(results)


def test_speed_script_on_cpu_writes_table_json_plot_recipe_and_profiles(tmp_path):
    result = run_script(
        "speed.py",
        "device=cpu",
        "sizes=[[224,224],[224,448]]",
        "stride_sweep=[224,56]",  # the training stride (teacher.stride=24) is added at 224x448
        "batch_sizes=[1,2]",
        "train_batch_sizes=[1,2]",
        "repeats=2",
        "recipe.images=1000",
        "recipe.epochs=3",
        "profile=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert "measured matmul peak" in result.stdout and "x FLOPs" in result.stdout
    assert "recipe estimate, 1000 images at 224x448 x 3 epochs" in result.stdout
    results = json.loads((tmp_path / "speed_results.json").read_text())
    assert results["device"]["device"] == "cpu" and results["config"]["backbone"]["name"] == "tiny"
    assert results["device"]["tf32"] is False  # tf32=true changes nothing on a CPU
    assert (tmp_path / "speed_strides.png").stat().st_size > 1000
    sizes = results["precisions"]["fp32"]["sizes"]
    assert [t["stride"] for t in sizes["224x224"]["teacher"]] == [224, 56]
    assert [t["stride"] for t in sizes["224x448"]["teacher"]] == [224, 56, 24]
    recipe = results["recipe"]["fp32"]
    assert recipe["size"] == [224, 448] and recipe["stride"] == 24
    assert recipe["cache_fill_hours"] == pytest.approx(
        1000 * sizes["224x448"]["teacher"][2]["seconds"] / 3600
    )
    for name in ("profile_student_224x448.txt", "profile_teacher_224x448_s24.txt"):
        text = (tmp_path / name).read_text()
        assert text.startswith("== ") and "fp32" in text and "aten::" in text


def _hand_made_results() -> dict:
    """Rates chosen so that the recipe's hours are round: 0.36 s/img fills 10,000 views in 1 h;
    25 img/s trains 9 epochs of them in 1 h; online at 1 img/s takes 25 h."""

    def teacher(stride, seconds):
        return {"stride": stride, "seconds": seconds}

    return {
        "precisions": {
            "bf16": {
                "sizes": {
                    "448x448": {"teacher": [teacher(24, 0.1)]},
                    "672x896": {"teacher": [teacher(224, 0.01), teacher(24, 0.36)]},
                },
                "training": {
                    "size": [672, 896],
                    "stride": 24,
                    "cached_images_per_second": {"1": 5.0, "8": 25.0, "4": 20.0},
                    "online_images_per_second": 1.0,
                },
            }
        }
    }


def test_recipe_estimate_adds_the_cache_fill_and_the_cached_epochs():
    results = _hand_made_results()
    recipe = recipe_estimate(results, images=10_000, epochs=9, precision="bf16")
    assert recipe["size"] == [672, 896] and recipe["stride"] == 24
    assert recipe["cached_batch"] == 8 and recipe["cached_images_per_second"] == 25.0
    assert recipe["cache_fill_hours"] == pytest.approx(1.0)
    assert recipe["cached_training_hours"] == pytest.approx(1.0)
    assert recipe["total_hours"] == pytest.approx(2.0)
    assert recipe["online_hours"] == pytest.approx(25.0)
    line = format_recipe(recipe)
    assert "10000 images at 672x896 x 9 epochs" in line and "= 2.00 h" in line
    results["precisions"]["bf16"]["training"]["stride"] = 32
    with pytest.raises(ValueError, match="stride 32 and 672x896"):
        recipe_estimate(results, images=10_000, epochs=9, precision="bf16")


def test_matmul_precision_switches_tf32_and_restores_the_previous_flags():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision
    restore = configure_matmul_precision(True)
    try:
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        with full_float32():  # the reference of the low-precision error
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        configure_matmul_precision(False)
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        restore()
    assert (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.conv.fp32_precision,
    ) == before


def test_profile_table_lists_the_aten_operators():
    layer = nn.Linear(32, 16)
    table = profile_table(lambda: layer(torch.randn(8, 32)), torch.device("cpu"))
    assert "aten::linear" in table and "CPU total" in table


@pytest.mark.parametrize("name", ["tiny", "siglip2-tiny"])
def test_attention_runs_through_sdpa_and_matches_the_math_kernel(name):
    fused = create_backbone(name)
    reference = create_backbone(name, fused_attention=False)
    images = torch.randn(2, 3, 80, 112)
    with torch.no_grad(), torch.profiler.profile() as profile:
        features = fused(images)
    names = {event.name for event in profile.events()}
    assert "aten::scaled_dot_product_attention" in names
    assert "aten::_native_multi_head_attention" not in names  # not nn.MultiheadAttention's own path
    with torch.no_grad():
        torch.testing.assert_close(features, reference(images), rtol=1e-4, atol=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


def test_renamed_speed_arguments_name_their_new_spelling(tiny_backbone):
    with pytest.raises(TypeError, match="strides= is now stride_sweep"):
        measure_speed(tiny_backbone, torch.device("cpu"), strides=[24])
