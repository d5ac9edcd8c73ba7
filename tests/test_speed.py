"""Speed measurement: helpers, the script on CPU, and compiled vs eager features."""

import json
import time

import pytest
import torch
from helpers import run_script
from torch import nn

from spar.models import create_backbone
from spar.speed import count_flops, format_table, measure_speed, relative_error, time_call


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


def test_speed_script_on_cpu_writes_table_json_and_plot(tmp_path):
    result = run_script(
        "speed.py",
        "device=cpu",
        "sizes=[[224,224],[224,448]]",
        "stride_sweep=[224,56,24]",
        "batch_sizes=[1,2]",
        "train_batch_sizes=[1,2]",
        "repeats=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert "measured matmul peak" in result.stdout and "x FLOPs" in result.stdout
    results = json.loads((tmp_path / "speed_results.json").read_text())
    assert results["device"]["device"] == "cpu" and results["config"]["backbone"]["name"] == "tiny"
    assert (tmp_path / "speed_strides.png").stat().st_size > 1000
    strides = [t["stride"] for t in results["precisions"]["fp32"]["sizes"]["224x448"]["teacher"]]
    assert strides == [224, 56, 24]


def test_compiled_student_gives_the_eager_features(tiny_backbone):
    images = torch.randn(1, 3, 96, 128)
    compiled = torch.compile(tiny_backbone)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), tiny_backbone(images), rtol=1e-4, atol=1e-4)


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
