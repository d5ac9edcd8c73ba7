"""``compile``: the student's blocks compiled once for every image size, equal to eager, in the
Python API and every entry point."""

import copy

import pytest
import torch

from spar.models import build_teacher, compile_backbone, compile_report, create_backbone
from spar.models.compiling import check_compile_target, describe_compile_report
from tests.helpers import small_run

SIZES = [(2, 64, 96), (2, 96, 128), (2, 80, 48), (1, 64, 96), (1, 112, 80)]


class GraphCounter:
    """A ``torch.compile`` backend that runs the captured graphs as they are and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name",
    ["tiny", pytest.param("siglip2-tiny", marks=SLOW), pytest.param("dinov3txt-tiny", marks=SLOW)],
)
def test_one_graph_per_batch_kind_serves_every_image_size(tiny_backbones, name):
    eager = tiny_backbones(name)
    compiled = compile_backbone(copy.deepcopy(eager), True, backend=(counter := GraphCounter()))
    with torch.no_grad():
        for batch, height, width in SIZES:
            images = torch.randn(batch, 3, height, width)
            torch.testing.assert_close(compiled(images), eager(images), rtol=0, atol=0)
    # Batch 1 is specialised by PyTorch; every other size and batch reuses the dynamic graph.
    assert counter.graphs == 2
    report = compile_report(compiled)
    assert report["shapes"] == len({(b, (h // 16) * (w // 16)) for b, h, w in SIZES})
    assert len(report["slowest_first_calls"]) == report["shapes"]
    assert "input shapes" in describe_compile_report(report)


def test_compiled_blocks_train_like_eager_ones(tiny_backbones):
    """Gradients through the compiled blocks equal eager ones, at two sizes."""
    eager = copy.deepcopy(tiny_backbones("tiny")).train()
    eager.set_trainable_blocks("last-2")
    compiled = compile_backbone(copy.deepcopy(eager), True, backend=(counter := GraphCounter()))
    for height, width in [(64, 96), (96, 64)]:
        images = torch.randn(2, 3, height, width)
        for model in (eager, compiled):
            model.zero_grad()
            model(images).square().mean().backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            if a.requires_grad:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert counter.graphs == 1


@pytest.mark.slow
def test_inductor_compiled_features_equal_eager_ones_at_two_sizes(tiny_backbone):
    compiled = compile_backbone(copy.deepcopy(tiny_backbone), True)
    with torch.no_grad():
        for size in [(96, 128), (64, 160)]:
            images = torch.randn(2, 3, *size)
            torch.testing.assert_close(
                compiled(images), tiny_backbone(images), rtol=1e-4, atol=1e-4
            )
    assert compile_report(compiled)["backend"] == "inductor"


def test_copies_and_state_dicts_are_those_of_the_eager_model(tiny_backbone):
    compiled = compile_backbone(copy.deepcopy(tiny_backbone), "max-autotune")
    assert compiled.compiled_blocks is not None
    assert copy.deepcopy(compiled).compiled_blocks is None
    assert compiled.state_dict().keys() == tiny_backbone.state_dict().keys()
    teacher = build_teacher(compiled, {"window": 64, "stride": 32}, precision="bf16")
    assert teacher.window_model.compiled_blocks is None
    assert compile_report(tiny_backbone) is None
    assert compile_report(compile_backbone(compiled, False)) is None


@pytest.mark.parametrize("setting", ["fast", 1, "true", None])
def test_a_bad_setting_fails_before_any_weight_is_read(tmp_path, setting):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(ValueError, match="compile must be true, false or one of"):
        create_backbone("tiny", pretrained=str(missing), compile=setting)


def test_compiling_the_student_with_teacher_features_is_refused():
    assert check_compile_target(True, "student") is True
    assert check_compile_target(False, "teacher") is False
    with pytest.raises(ValueError, match="teacher.compile"):
        check_compile_target("reduce-overhead", "teacher")


@pytest.mark.slow
def test_training_with_compile_matches_eager_training_and_reports_it(
    tmp_path, capture_only_compile
):
    """The training entry point compiles the student (graph capture only: the captured graphs
    run as they are, so the checkpoint must be bitwise the eager one) and reports it."""
    from safetensors.torch import load_file

    eager, eager_dir = small_run(tmp_path, "eager", "trainer.epochs=1")
    compiled, compiled_dir = small_run(tmp_path, "compiled", "trainer.epochs=1", "compile=true")
    assert eager["compile"] is None and compiled["compile"]["compile"] is True
    assert compiled["compile"]["shapes"] >= 2 and capture_only_compile.graphs >= 2
    weights = [load_file(d / "checkpoints" / "last.safetensors") for d in (eager_dir, compiled_dir)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=0, msg=key)


@pytest.fixture
def capture_only_compile(monkeypatch):
    """``torch.compile`` with the graph-counting backend: entry points compile for real (graph
    capture, guards, recompiles) without the minutes of CPU code generation."""
    counter = GraphCounter()
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counter})
    )
    return counter


def test_evaluation_with_a_compiled_student_scores_as_the_eager_one(tmp_path, capture_only_compile):
    from spar.evaluation import run_evaluation
    from tests.helpers import eval_config, write_benchmark

    write_benchmark("voc21", tmp_path / "data")
    common = ["dataset=voc21", f"dataset.root={tmp_path / 'data'}"]
    eager = run_evaluation(eval_config(*common), tmp_path / "eager")
    compiled = run_evaluation(eval_config(*common, "compile=true"), tmp_path / "compiled")
    assert compiled["miou"] == eager["miou"] and eager["compile"] is None
    assert compiled["compile"]["shapes"] >= 1 and capture_only_compile.graphs >= 1
    with pytest.raises(ValueError, match="teacher.compile"):
        run_evaluation(eval_config(*common, "compile=true", "features=teacher"), tmp_path / "t")


@pytest.mark.slow
def test_speed_times_a_compiled_student_and_reports_its_compile_time(
    tiny_backbone, capture_only_compile
):
    from spar.tools.speed import format_table, measure_speed

    results = measure_speed(
        copy.deepcopy(tiny_backbone),
        torch.device("cpu"),
        sizes=[[64, 96]],
        stride_sweep=[32],
        teacher={"window": 64, "stride": 32},
        batch_sizes=(1, 2),
        train_batch_sizes=(1,),
        warmup=1,
        repeats=1,
        compile=True,
        log=lambda line: None,
    )
    assert results["compile"]["shapes"] == 2 and capture_only_compile.graphs == 2
    assert "student compile=True: 2 input shapes" in format_table(results)


def test_a_compiled_teacher_over_a_compiled_backbone_traces_in_one_piece(
    tiny_backbone, capture_only_compile
):
    """``teacher.compile`` over a backbone compiled with ``compile`` (segment with
    ``show_teacher``): the outer compile takes the blocks in, without a graph break."""
    import warnings

    compiled = compile_backbone(copy.deepcopy(tiny_backbone), True)
    teacher = build_teacher(compiled, {"window": 64, "stride": 32, "compile": True})
    reference = build_teacher(tiny_backbone, {"window": 64, "stride": 32})
    images = torch.randn(1, 3, 96, 128)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.testing.assert_close(teacher(images), reference(images), rtol=0, atol=0)
    assert not [w for w in caught if "graph break" in str(w.message).lower()]
    assert compile_report(compiled)["shapes"] == 0  # the teacher's compile ran the blocks
