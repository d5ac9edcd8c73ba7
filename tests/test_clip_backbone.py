"""Backbone ``clip``: any open_clip CLIP ViT, its configuration read from open_clip; the tiny
variants (patch 16 and 14); the teacher's stitching at patch 14 and stride 24 against a loop
reference; training, evaluation and the speed benchmark with them; SigLIP2 ``architecture=``."""

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import eval_config, small_run, write_benchmark
from open_clip.transformer import QuickGELU

from spar.config import SettingError
from spar.distill.optimization import StudentOptimizer
from spar.distill.settings import OptimSettings
from spar.evaluation import run_evaluation
from spar.models import WeightLoadingError, backbone_entry, build_teacher, create_backbone
from spar.tools import speed

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def p14():
    return create_backbone("clip-tiny-p14")


def test_tiny_variants_read_patch_window_and_dim_from_their_open_clip_config(p14):
    assert (p14.patch_size, p14.native_size, p14.embed_dim) == (14, (112, 112), 64)
    assert len(p14.blocks) == 4 and p14.blocks[0].attn.embed_dim == 64
    tiny = create_backbone("clip-tiny")
    assert (tiny.patch_size, tiny.native_size, tiny.embed_dim) == (16, (128, 128), 64)
    assert (p14.mean, p14.std) == (OPENAI_MEAN, OPENAI_STD)
    assert create_backbone("clip-tiny-p14")(torch.randn(1, 3, 100, 130)).shape == (1, 64, 8, 10)


def test_clip_random_vit_b16_is_configured_from_the_built_model():
    backbone = create_backbone("clip", None)  # ViT-B-16, random: offline
    assert (backbone.patch_size, backbone.native_size, backbone.embed_dim) == (16, (224, 224), 512)
    assert (backbone.mean, backbone.std) == (OPENAI_MEAN, OPENAI_STD)
    assert backbone.identity == {"name": "clip", "pretrained": None, "options": {}}
    assert build_teacher(backbone).window == (224, 224)


def test_clip_registry_entry_is_vit_b16_openai():
    config = backbone_entry("clip").config
    assert (config.architecture, config.default_pretrained) == ("ViT-B-16", "openai")
    assert (config.native_size, config.patch_size, config.embed_dim) == (224, 16, 512)
    assert set(backbone_entry("clip").options) >= {"architecture", "dense_head"}


@pytest.mark.slow  # builds a random ViT-L/14 at 336 (about 300M parameters)
def test_clip_vit_l14_336_has_patch_14_window_336_and_dim_768():
    backbone = create_backbone("clip", None, architecture="ViT-L-14-336", dense_head="sclip")
    assert (backbone.patch_size, backbone.native_size, backbone.embed_dim) == (14, (336, 336), 768)
    assert backbone(torch.randn(1, 3, 56, 70)).shape == (1, 768, 4, 5)


def test_quickgelu_tags_build_quickgelu_and_others_gelu(monkeypatch):
    """``openai`` and ``metaclip_fullcc`` were trained with QuickGELU: the model is built with it
    (nothing is downloaded: the builder is inspected; only the ``openai`` one is built)."""
    builders, models = {}, []

    def capture(model_name, pretrained, build=None, quick_gelu=False):
        builders[pretrained] = (build, quick_gelu)
        if not models:
            models.append(build())
        return models[0]

    monkeypatch.setattr("spar.models.clip.create_open_clip_model", capture)
    for tag in ("openai", "metaclip_fullcc", "laion2b_s34b_b88k"):
        create_backbone("clip", tag)
    assert {tag: quick for tag, (_, quick) in builders.items()} == {
        "openai": True,
        "metaclip_fullcc": True,
        "laion2b_s34b_b88k": False,
    }
    assert isinstance(models[0].visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ("EVA02-B-16", "timm trunk 'eva02_base_patch16_clip_224'.*EVA02"),
        ("RN50", "ResNet"),
        ("coca_ViT-B-32", "attentional pooler"),
        ("ViT-Q-99", "not an open_clip model"),
    ],
)
def test_clip_refuses_towers_it_cannot_run_with_a_clear_error(architecture, message):
    with pytest.raises(SettingError, match=f"backbone.architecture '{architecture}'.*{message}"):
        create_backbone("clip", None, architecture=architecture)


def stitch_reference(backbone, image, window, stride):
    """The paper's stitching by plain loops: pad to the patch grid; windows every ``stride``
    plus one flush with the border; each window's map upsampled bilinearly by r = 7 (patch 14,
    stride 24: the smallest r with 14 % r == 0 and 24 % (14 / r) == 0) to 2-pixel cells, summed
    into a cell canvas at the window's offset, divided by the coverage, resized to the grid."""
    patch, r, cell = 14, 7, 2
    assert 24 % (patch // r) == 0 and all(24 % (patch // q) for q in (1, 2))
    height, width = (math.ceil(s / patch) * patch for s in image.shape[-2:])
    padded = F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))

    def origins(length):
        found = list(range(0, length - window + 1, stride))
        return found if found[-1] == length - window else [*found, length - window]

    canvas = torch.zeros(backbone.embed_dim, height // cell, width // cell)
    counts = torch.zeros(1, height // cell, width // cell)
    for y in origins(height):
        for x in origins(width):
            with torch.no_grad():
                crop = backbone(padded[None, :, y : y + window, x : x + window])
            up = F.interpolate(crop, scale_factor=r, mode="bilinear", align_corners=False)[0]
            cy, cx, rows, cols = y // cell, x // cell, window // cell, window // cell
            canvas[:, cy : cy + rows, cx : cx + cols] += up
            counts[:, cy : cy + rows, cx : cx + cols] += 1
    grid = (height // patch, width // patch)
    return F.interpolate((canvas / counts)[None], size=grid, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("head", ["maskclip", "naclip"])
def test_teacher_stitches_patch_14_at_stride_24_as_the_loop_reference(head):
    backbone = create_backbone("clip-tiny-p14", dense_head=head)
    # Padded to 126x154: windows at y in (0, 14), x in (0, 24, 42), the last ones flush.
    image = torch.randn(3, 126, 150, generator=torch.Generator().manual_seed(0))
    teacher = build_teacher(backbone, {"stride": 24})
    assert teacher.window == (112, 112)  # the native size
    assert teacher.layout(126, 150).factor == (7, 7)
    assert teacher.num_windows(126, 150) == 6
    expected = stitch_reference(backbone, image, 112, 24)
    assert expected.shape == (1, 64, 9, 11)
    torch.testing.assert_close(teacher(image[None]), expected, rtol=1e-4, atol=1e-5)


def test_a_train_step_with_clip_tiny_p14_and_each_head_moves_the_student_toward_the_teacher():
    """One training step (the trainer's ``StudentOptimizer``) on the stride-24 teacher's map of
    a 140x168 image: the loss is finite and drops on the next evaluation."""
    for head in ("maskclip", "naclip"):
        backbone = create_backbone("clip-tiny-p14", dense_head=head, trainable_blocks="last-2")
        image = torch.randn(1, 3, 140, 168, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            target = build_teacher(backbone, {"stride": 24})(image)
        student = backbone.train()
        update = StudentOptimizer(
            student,
            OptimSettings(lr=1e-3),
            device=torch.device("cpu"),
            total_steps=1,
            precision="fp32",
        )
        first = float(update.train_step(image, target))
        with torch.no_grad():
            after = F.mse_loss(student(image), target).item()
        assert math.isfinite(first) and after < first


def test_a_training_run_with_clip_tiny_p14_and_a_dense_head(tmp_path):
    summary, run = small_run(
        tmp_path,
        "run",
        "backbone=clip-tiny-p14",
        "backbone.dense_head=clearclip",
        "teacher.window=112",
        "trainer.epochs=1",
    )
    assert summary["steps"] == summary["train_views"] > 0
    assert math.isfinite(summary["heldout_mse_after"])
    student = create_backbone(
        "clip-tiny-p14", dense_head="clearclip", checkpoint=summary["checkpoint"]
    )
    assert student(torch.randn(1, 3, 112, 112)).shape == (1, 64, 8, 8)
    with pytest.raises(WeightLoadingError, match="dense_head 'clearclip', not 'maskclip'"):
        create_backbone("clip-tiny-p14", checkpoint=summary["checkpoint"])


@pytest.mark.parametrize("features", ["student", "teacher"])
def test_evaluation_with_clip_tiny_p14_naclip(tmp_path, features):
    write_benchmark("voc21", tmp_path / "data")
    config = eval_config(
        "dataset=voc21",
        f"dataset.root={tmp_path / 'data'}",
        "backbone=clip-tiny-p14",
        "backbone.dense_head=naclip",
        f"features={features}",
        "teacher.stride=24",
    )
    results = run_evaluation(config, tmp_path / "run")
    assert 0 <= results["miou"] <= 100
    written = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert written["config"]["backbone"]["dense_head"] == "naclip"


@pytest.mark.slow  # a random ViT-B/16 through run_evaluation
def test_evaluation_with_backbone_clip_naclip_random_weights(tmp_path):
    write_benchmark("voc21", tmp_path / "data")
    config = eval_config(
        "dataset=voc21",
        f"dataset.root={tmp_path / 'data'}",
        "backbone=clip",
        "backbone.pretrained=null",
        "backbone.dense_head=naclip",
        "features=teacher",
    )
    assert 0 <= run_evaluation(config, tmp_path / "run")["miou"] <= 100


@pytest.mark.parametrize(
    ("created", "argument", "expected"),
    [("last-1", None, [3]), ("last-1", "last-2", [2, 3]), ("none", None, [2, 3])],
)
def test_speed_training_step_trains_the_configured_blocks(created, argument, expected):
    """The speed benchmark's training step trains ``backbone.trainable_blocks`` (as
    ``create_backbone`` applied it), an explicit ``trainable_blocks``, or the training default
    last-2 for a backbone created with none."""
    backbone = create_backbone("clip-tiny-p14", dense_head="naclip", trainable_blocks=created)
    result = speed.time_training_step(
        backbone,
        (56, 56),
        {"stride": 28, "window": 56},
        torch.device("cpu"),
        "fp32",
        [1],
        0,
        1,
        trainable_blocks=argument,
    )
    assert result["trainable_blocks"] == expected
    blocks = backbone.blocks
    mlp = sum(p.numel() for m in (blocks[-1].ln_2, blocks[-1].mlp) for p in m.parameters())
    total = sum(p.numel() for i in expected for p in blocks[i].parameters()) - mlp
    assert result["trainable_parameters"] == total


def test_siglip2_architecture_is_validated_and_described_from_open_clip():
    from spar.models.open_clip_common import describe_model
    from spar.models.siglip2 import SIGLIP2

    with pytest.raises(SettingError, match="backbone.architecture 'ViT-B-16'.*SigLIP"):
        create_backbone("siglip2", None, architecture="ViT-B-16")
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = open_clip.create_model("ViT-SO400M-16-SigLIP2-512", device="meta")
    trunk = model.visual.trunk
    config = describe_model(
        SIGLIP2,
        model,
        "ViT-SO400M-16-SigLIP2-512",
        "webli",
        patch_size=trunk.patch_embed.patch_size[0],
        embed_dim=trunk.attn_pool.out_features,
    )
    assert (config.native_size, config.patch_size, config.embed_dim) == (512, 16, 1152)
    assert (config.mean, config.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert config.architecture == "ViT-SO400M-16-SigLIP2-512"


@pytest.mark.slow  # builds a random SigLIP2 ViT-L/16 at 512 (about 20 s on 2 cores)
def test_siglip2_vit_l16_builds_through_architecture():
    backbone = create_backbone(
        "siglip2", None, architecture="ViT-L-16-SigLIP2-512", tokenizer=lambda texts: None
    )
    assert (backbone.patch_size, backbone.native_size, backbone.embed_dim) == (16, (512, 512), 1024)
    assert backbone(torch.randn(1, 3, 64, 80)).shape == (1, 1024, 4, 5)
