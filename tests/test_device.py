"""Everything the library builds lands on the device of its inputs or of its backbone.

No GPU is needed: PyTorch's ``meta`` device stands in for CUDA. Like a GPU, it refuses most
operations that mix it with CPU tensors, and a tensor the library creates without ``device=``
shows up as a CPU tensor next to meta ones. (The GPU tier, ``pytest -m gpu``, runs the same
paths on CUDA.)
"""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from spar.models import SlidingWindowTeacher, create_backbone
from spar.segmentation import OpenVocabSegmenter, build_text_classifier

STAND_IN = torch.device("meta")
CLASSES = ["sky", "road, street", ["car", "automobile"]]
SPAR = Path(__file__).resolve().parents[1] / "spar"


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``module`` and its submodules."""
    found = {name: t for name, t in module.named_parameters()}
    found.update(module.named_buffers())
    for prefix, sub in module.named_modules():
        for attribute, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                found[f"{prefix}.{attribute}".lstrip(".")] = value
    return found


def assert_all_on(module: nn.Module, device: torch.device) -> None:
    elsewhere = {name: t.device for name, t in tensors_of(module).items() if t.device != device}
    assert not elsewhere, f"tensors not on {device}: {elsewhere}"


@pytest.fixture
def backbone_on_stand_in():
    return create_backbone("tiny").to(STAND_IN)


@pytest.mark.parametrize("dense", ["student", "teacher"])
def test_segmenter_from_a_backbone_lives_on_the_backbone_device(backbone_on_stand_in, dense):
    features = None if dense == "student" else SlidingWindowTeacher(backbone_on_stand_in)
    segmenter = OpenVocabSegmenter.from_backbone(
        backbone_on_stand_in, CLASSES, dense=features, templates="single"
    )
    assert_all_on(segmenter, STAND_IN)
    assert segmenter.name_to_class.device == STAND_IN  # the buffer that crashed on CUDA


def test_segmenter_from_a_backbone_follows_a_text_encoder_on_the_cpu(backbone_on_stand_in):
    """A backbone whose text tower returns CPU embeddings still gets a segmenter on its device."""

    class CpuText(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, images):
            return self.backbone(images)

        def encode_text(self, texts):
            return torch.randn(len(texts), self.backbone.embed_dim)

    wrapper = CpuText(backbone_on_stand_in)
    segmenter = OpenVocabSegmenter.from_backbone(wrapper, CLASSES, templates="single")
    assert_all_on(segmenter, STAND_IN)


def test_segmenter_follows_to(tiny_backbone):
    segmenter = OpenVocabSegmenter.from_backbone(tiny_backbone, CLASSES, templates="single")
    assert_all_on(segmenter, torch.device("cpu"))
    moved = OpenVocabSegmenter(
        create_backbone("tiny"), tiny_backbone.encode_text, CLASSES, templates="single"
    ).to(STAND_IN)
    assert_all_on(moved, STAND_IN)


def test_text_classifier_is_built_on_the_encoder_device():
    def encode(texts):
        return torch.ones(len(texts), 8, device=STAND_IN)

    embeddings, name_to_class = build_text_classifier(encode, CLASSES, "single")
    assert embeddings.device == STAND_IN and name_to_class.device == STAND_IN
    assert tuple(name_to_class.shape) == (5,)


def test_the_notebook_api_runs_on_the_backbone_device(backbone_on_stand_in):
    """The README's notebook calls on the stand-in device: every output stays there."""
    images = torch.zeros(1, 3, 100, 150, device=STAND_IN)  # not a multiple of 16: padded
    student = backbone_on_stand_in(images)
    teacher = SlidingWindowTeacher(backbone_on_stand_in, window=64, stride=24)(images)
    assert student.device == teacher.device == STAND_IN
    assert student.shape == teacher.shape == (1, 64, 7, 10)
    segmenter = OpenVocabSegmenter.from_backbone(
        backbone_on_stand_in, CLASSES, templates="single", prob_threshold=0.5
    )
    assert segmenter.class_probabilities(images).shape == (1, 3, 100, 150)
    mask = segmenter.predict(images, output_size=(50, 75))
    assert mask.device == STAND_IN and mask.shape == (1, 50, 75)


# -- the source audit --------------------------------------------------------------------------

FACTORIES = {"tensor", "as_tensor", "arange", "zeros", "ones", "empty", "full", "eye"}
FACTORIES |= {"linspace", "rand", "randn", "randint", "randperm"}
PARAMETER_INIT = "parameter initialisation, moved by .to()"
# Reviewed calls without device=, (file, enclosing function, factory) -> why the CPU is right.
CPU_BY_DESIGN = {
    ("tools/speed.py", "_images", "randn"): "seeded on the CPU: every device sees the same images",
    ("distill/buckets.py", "epoch_order", "randperm"): "sampler indices are host-side lists",
    ("distill/buckets.py", "bucket_batches", "randperm"): "sampler indices are host-side lists",
    ("metrics.py", "_flat_long", "as_tensor"): "the confusion matrix is a CPU accumulator",
    ("metrics.py", "__init__", "zeros"): "the confusion matrix is a CPU accumulator",
    ("models/dinov3txt_layers.py", "__init__", "full"): PARAMETER_INIT,
    ("models/dinov3txt_layers.py", "__init__", "randn"): PARAMETER_INIT,
    ("models/dinov3txt_layers.py", "__init__", "tensor"): PARAMETER_INIT,
    ("tools/fault_trials_guarantees.py", "_amplifying_torch_file", "zeros"): "a file's contents",
    ("tools/fault_trials_guarantees.py", "_deflated_torch_file", "zeros"): "a file's contents",
}


def factory_calls_without_device() -> set[tuple[str, str, str]]:
    """(file, enclosing function, factory) of every ``torch.<factory>(...)`` without device=."""
    found = set()
    for path in SPAR.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                call = node.func if isinstance(node, ast.Call) else None
                if not (
                    isinstance(call, ast.Attribute)
                    and call.attr in FACTORIES
                    and isinstance(call.value, ast.Name)
                    and call.value.id == "torch"
                ):
                    continue
                if not any(keyword.arg == "device" for keyword in node.keywords):
                    relative = path.relative_to(SPAR).as_posix()
                    found.add((relative, function.name, call.attr))
    return found


def test_every_tensor_factory_in_the_library_names_its_device():
    unreviewed = factory_calls_without_device() - set(CPU_BY_DESIGN)
    assert not unreviewed, (
        "torch factories without device= (pass the device of the inputs or the model, or add "
        f"the call to CPU_BY_DESIGN with the reason): {sorted(unreviewed)}"
    )


def test_normalize_puts_images_on_the_backbone_device(backbone_on_stand_in):
    """The README's ``x = backbone.normalize(image)`` on a CPU image feeds a GPU backbone."""
    x = backbone_on_stand_in.normalize(torch.rand(3, 40, 56))
    assert x.device == STAND_IN and x.shape == (1, 3, 40, 56)


def test_segmenter_scores_are_float32_under_bf16_autocast(tiny_backbone):
    segmenter = OpenVocabSegmenter.from_backbone(tiny_backbone, CLASSES, templates="single")
    images = tiny_backbone.normalize(torch.rand(3, 48, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        name_logits = segmenter.name_logits(images)
        scores = segmenter.class_probabilities(images)
    assert name_logits.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(scores, segmenter.class_probabilities(images), atol=0.05, rtol=0)
