"""DINOv3.txt: shapes, official key names loading strictly, released SPAR weights, end to end;
the dense features, image fit and RoPE periods of the SPAR authors' code."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CONFIGS,
    eval_config,
    miou_from_pngs,
    small_run,
    write_benchmark,
    write_scene_images,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spar.models import SlidingWindowTeacher, WeightLoadingError, backbone_entry, create_backbone
from spar.models.dinov3txt import TINY_ARCHITECTURE, DinoV3TxtBackbone, official_state
from spar.models.dinov3txt_layers import DinoTxtArchitecture, DinoTxtModel
from spar.segmentation import OpenVocabSegmenter

ARCH = TINY_ARCHITECTURE
# The tiny trunk's RoPE periods 100 ** (2 i / 8), i < 4, rounded to bf16 (8 significant bits):
# 3.1623 -> 3.15625 and 31.623 -> 31.625, as the official backbone file rounds its periods.
TINY_BF16_PERIODS = [1.0, 3.15625, 10.0, 31.625]


def bf16_rope_periods(arch: DinoTxtArchitecture) -> torch.Tensor:
    """(head_dim / 4,) DINOv3 RoPE periods (base 100) rounded to bf16, as the official file."""
    head_dim = arch.width // arch.heads
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2)
    return (100.0**exponents).bfloat16().float()


def official_backbone_state(arch: DinoTxtArchitecture, registers: int = 4) -> dict:
    """Random tensors under the official DINOv3 ViT key names (dinov3_vitl16_pretrain_*.pth)."""
    width = arch.width
    state = {
        "cls_token": torch.randn(1, 1, width),
        "storage_tokens": torch.randn(1, registers, width),
        "mask_token": torch.zeros(1, width),
        "patch_embed.proj.weight": torch.randn(width, 3, 16, 16) * 0.02,
        "patch_embed.proj.bias": torch.randn(width) * 0.02,
        "rope_embed.periods": bf16_rope_periods(arch),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    for i in range(arch.depth):
        block = f"blocks.{i}."
        k_masked = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
        state |= {
            block + "norm1.weight": torch.ones(width),
            block + "norm1.bias": torch.zeros(width),
            block + "attn.qkv.weight": torch.randn(3 * width, width) * 0.05,
            block + "attn.qkv.bias": torch.randn(3 * width) * 0.05,
            block + "attn.qkv.bias_mask": k_masked,
            block + "attn.proj.weight": torch.randn(width, width) * 0.05,
            block + "attn.proj.bias": torch.zeros(width),
            block + "ls1.gamma": torch.full((width,), 0.1),
            block + "norm2.weight": torch.ones(width),
            block + "norm2.bias": torch.zeros(width),
            block + "mlp.fc1.weight": torch.randn(4 * width, width) * 0.05,
            block + "mlp.fc1.bias": torch.zeros(4 * width),
            block + "mlp.fc2.weight": torch.randn(width, 4 * width) * 0.05,
            block + "mlp.fc2.bias": torch.zeros(width),
            block + "ls2.gamma": torch.full((width,), 0.1),
        }
    return state


def official_head_and_text_state(arch: DinoTxtArchitecture) -> dict:
    """Random tensors under the official dino.txt names (..._vision_head_and_text_encoder-*.pth)."""
    width, text = arch.width, arch.text_width
    hidden = int(4 * width * 2 / 3)
    hidden += -hidden % 64
    state = {"logit_scale": torch.tensor([2.0])}
    for i in range(arch.head_blocks):
        block = f"visual_model.head.blocks.{i}."
        state |= {
            block + "norm1.weight": torch.ones(width),
            block + "norm1.bias": torch.zeros(width),
            block + "attn.qkv.weight": torch.randn(3 * width, width) * 0.05,
            block + "attn.proj.weight": torch.randn(width, width) * 0.05,
            block + "attn.proj.bias": torch.zeros(width),
            block + "ls1.gamma": torch.full((width,), 0.1),
            block + "norm2.weight": torch.ones(width),
            block + "norm2.bias": torch.zeros(width),
            block + "mlp.w1.weight": torch.randn(hidden, width) * 0.05,
            block + "mlp.w1.bias": torch.zeros(hidden),
            block + "mlp.w2.weight": torch.randn(hidden, width) * 0.05,
            block + "mlp.w2.bias": torch.zeros(hidden),
            block + "mlp.w3.weight": torch.randn(width, hidden) * 0.05,
            block + "mlp.w3.bias": torch.zeros(width),
            block + "ls2.gamma": torch.full((width,), 0.1),
        }
    state |= {
        "visual_model.head.ln_final.weight": torch.ones(width),
        "visual_model.head.ln_final.bias": torch.zeros(width),
        "text_model.backbone.token_embedding.weight": torch.randn(arch.vocab_size, text) * 0.02,
        "text_model.backbone.positional_embedding": torch.randn(arch.context_length, text) * 0.01,
        "text_model.backbone.ln_final.weight": torch.ones(text),
        "text_model.backbone.ln_final.bias": torch.zeros(text),
        "text_model.head.linear_projection.weight": torch.randn(arch.embed_dim, text) * 0.05,
    }
    for i in range(arch.text_layers):
        block = f"text_model.backbone.blocks.{i}."
        state |= {
            block + "attention_norm.weight": torch.ones(text),
            block + "attention_norm.bias": torch.zeros(text),
            block + "attention.qkv.weight": torch.randn(3 * text, text) * 0.05,
            block + "attention.proj.weight": torch.randn(text, text) * 0.05,
            block + "attention.proj.bias": torch.zeros(text),
            block + "ffn_norm.weight": torch.ones(text),
            block + "ffn_norm.bias": torch.zeros(text),
            block + "feed_forward.fc1.weight": torch.randn(4 * text, text) * 0.05,
            block + "feed_forward.fc1.bias": torch.zeros(4 * text),
            block + "feed_forward.fc2.weight": torch.randn(text, 4 * text) * 0.05,
            block + "feed_forward.fc2.bias": torch.zeros(text),
        }
    return state


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov3")
    backbone, head = official_backbone_state(ARCH), official_head_and_text_state(ARCH)
    torch.save(backbone, folder / "dinov3_vitl16_pretrain_lvd1689m-test.pth")
    torch.save(head, folder / "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-test.pth")
    return (
        folder / "dinov3_vitl16_pretrain_lvd1689m-test.pth",
        folder / "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-test.pth",
        backbone,
        head,
    )


@pytest.fixture
def tiny(tiny_backbones):
    """The shared dinov3txt-tiny (its contract tests are in test_backbones.py)."""
    return tiny_backbones("dinov3txt-tiny")


def test_text_is_the_patch_aligned_half(tiny):
    with torch.no_grad():
        text = tiny.encode_text(["a photo of a cat", "road"])
        tokens = tiny.tokenizer(["a photo of a cat", "road"])
        full = tiny.model.text_model(tokens)
    assert text.shape == (2, ARCH.width) and full.shape == (2, 2 * ARCH.width)
    torch.testing.assert_close(text, full[:, ARCH.width :])


def test_official_files_load_strictly(official_files):
    backbone_path, head_path, backbone_state, head_state = official_files
    model = create_backbone(
        "dinov3txt-tiny", pretrained="official", backbone_weights=backbone_path, weights=head_path
    )
    state = model.state_dict()
    trunk = "model.visual_model.backbone."
    torch.testing.assert_close(state[trunk + "cls_token"], backbone_state["cls_token"])
    torch.testing.assert_close(state[trunk + "reg_token"], backbone_state["storage_tokens"])
    torch.testing.assert_close(
        state[trunk + "blocks.1.gamma_1"], backbone_state["blocks.1.ls1.gamma"]
    )
    qkv_bias = backbone_state["blocks.0.attn.qkv.bias"]
    torch.testing.assert_close(state[trunk + "blocks.0.attn.q_bias"], qkv_bias[: ARCH.width])
    for key, value in head_state.items():
        torch.testing.assert_close(state["model." + key], value)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 80))).all()


def test_missing_official_keys_are_listed(official_files, tmp_path):
    backbone_path, _, _, head_state = official_files
    partial = dict(head_state)
    partial.pop("visual_model.head.ln_final.weight")
    torch.save(partial, tmp_path / "head.pth")
    with pytest.raises(WeightLoadingError, match="missing keys: visual_model.head.ln_final.weight"):
        create_backbone(
            "dinov3txt-tiny",
            pretrained="official",
            backbone_weights=backbone_path,
            weights=tmp_path / "head.pth",
        )


def test_official_files_are_required_and_checked(official_files):
    with pytest.raises(WeightLoadingError, match="dinov3_vitl16_pretrain_lvd1689m"):
        create_backbone("dinov3txt-tiny", pretrained="official")
    backbone_path, head_path, _, _ = official_files
    with pytest.raises(WeightLoadingError, match="storage_tokens"):
        create_backbone(
            "dinov3txt-tiny", pretrained="official", backbone_weights=head_path, weights=head_path
        )


def test_released_spar_checkpoint_with_official_trunk_names_loads(official_files, tmp_path):
    _, _, backbone_state, head_state = official_files
    released = {
        f"segmentor.net.model.visual_model.backbone.{k}": v for k, v in backbone_state.items()
    }
    released |= {f"segmentor.net.model.{k}": v for k, v in head_state.items()}
    torch.save({"state_dict": released, "epoch": 9}, tmp_path / "spar_dinov3txt.ckpt")
    model = create_backbone("dinov3txt-tiny", checkpoint=tmp_path / "spar_dinov3txt.ckpt")
    torch.testing.assert_close(
        model.state_dict()["model.visual_model.backbone.reg_token"],
        backbone_state["storage_tokens"],
    )
    periods = model.model.visual_model.backbone.rope.periods
    assert periods.tolist() == TINY_BF16_PERIODS


def test_official_architecture_fits_the_official_file_layout():
    """The ViT-L/16 dino.txt sizes with timm's trunk have exactly the keys and shapes of the two
    official files, and the rotary periods the backbone file stores (which fix the head count);
    the backbone follows its registry config. Built on the meta device: no memory, no time."""
    arch, config = DinoTxtArchitecture(), backbone_entry("dinov3txt").config
    with torch.device("meta"):
        model = DinoTxtModel(arch, config.architecture, config.native_size)
        backbone_file = official_backbone_state(arch)
        head_file = official_head_and_text_state(arch)
    state = official_state(model, backbone_file, head_file)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    trunk = model.visual_model.backbone
    assert trunk.rope.periods.shape == backbone_file["rope_embed.periods"].shape
    assert trunk.num_prefix_tokens == 1 + backbone_file["storage_tokens"].shape[1]
    backbone = DinoV3TxtBackbone(model, config, tokenizer=None)
    assert (backbone.embed_dim, backbone.patch_size) == (config.embed_dim, config.patch_size)
    assert backbone.native_size == (config.native_size, config.native_size) == (384, 384)
    assert head_file["text_model.head.linear_projection.weight"].shape[0] == 2 * config.embed_dim


def test_trainable_blocks_are_the_trunk_tail(tiny):
    fresh = create_backbone("dinov3txt-tiny", trainable_blocks="last-2")
    trainable = {
        n.split(".blocks.")[1].split(".")[0] for n, p in fresh.named_parameters() if p.requires_grad
    }
    assert trainable == {"2", "3"}
    assert all(
        "visual_model.backbone.blocks" in n for n, p in fresh.named_parameters() if p.requires_grad
    )


def test_teacher_student_and_segmenter_run(tiny):
    image = torch.randn(1, 3, 160, 200)
    teacher = SlidingWindowTeacher(tiny, stride=24)
    with torch.no_grad():
        assert teacher(image).shape == tiny(image).shape
        mask = OpenVocabSegmenter.from_backbone(tiny, ["sky", "road, street"]).predict(image)
    assert mask.shape == (1, 160, 200)


def test_distillation_runs_on_the_tiny_config(tmp_path):
    images = write_scene_images(tmp_path / "images", count=4)
    summary, _ = small_run(
        tmp_path,
        "run",
        "backbone.name=dinov3txt-tiny",
        "teacher.window=64",
        "trainer.epochs=1",
        "optim.lr=1e-3",
        images=images,
    )
    assert summary["steps"] == summary["train_views"] and summary["heldout_mse_after"] is not None


def test_tokenizer_is_clip_bpe_with_77_tokens(tmp_path):
    import open_clip

    model = create_backbone("dinov3txt-tiny")
    tokens = model.tokenizer(["A Photo of a CAT."])
    assert tokens.shape == (1, 77)
    assert torch.equal(tokens, open_clip.tokenize(["a photo of a cat."]))
    assert int(tokens.argmax()) == 7  # start, "a photo of a cat ." (6 pieces), end-of-text
    vocab = open_clip.tokenizer.default_bpe()
    local = create_backbone("dinov3txt-tiny", bpe_path=vocab)
    assert torch.equal(local.tokenizer(["a cat"]), model.tokenizer(["a cat"]))
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        create_backbone("dinov3txt-tiny", bpe_path=str(tmp_path / "nowhere.txt.gz")).tokenizer(
            ["x"]
        )


def test_evaluation_and_demo_run_on_the_tiny_config(tmp_path, tiny):

    from spar.data import SAMPLE_IMAGES
    from spar.evaluation import run_evaluation
    from spar.tools.demo import compare_teacher_student

    write_benchmark("cityscapes", tmp_path / "cs")
    cfg = eval_config(
        "dataset=cityscapes",
        f"dataset.root={tmp_path / 'cs'}",
        "backbone.name=dinov3txt-tiny",
        "features=teacher",
        "teacher.window=64",
        "save_predictions=true",
    )
    results = run_evaluation(cfg, tmp_path / "eval")
    recomputed, _ = miou_from_pngs("cityscapes", tmp_path / "cs", tmp_path / "eval" / "predictions")
    assert results["num_images"] == 3 and results["miou"] == pytest.approx(recomputed, abs=1e-9)
    summary = compare_teacher_student(
        tiny, [SAMPLE_IMAGES / "cat.jpg"], ["cat", "floor"], tmp_path / "demo", bounds=(160, 128)
    )
    assert (
        summary["images"][0]["windows"] >= 1 and (tmp_path / "demo" / "cat_features.png").is_file()
    )


# -- the SPAR authors' dense path (naomikombol/SPAR models/model_dinov3txt.py, encode_image) ----


def trunk_tokens(backbone: DinoV3TxtBackbone, images: torch.Tensor) -> torch.Tensor:
    """timm's own ``Eva.forward_features`` (blocks, then the final norm): (B, 5 + N, D)."""
    return backbone.model.visual_model.backbone.forward_features(images)


def as_grid(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, N, C) row-major patch tokens -> (B, C, rows, cols)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)


def test_dense_features_are_the_trunk_norm_patches_without_the_head(tiny):
    """Output [2] of Meta's get_class_and_patch_tokens: last block, trunk norm, patches only."""
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = as_grid(trunk_tokens(tiny, images)[:, 5:], 4, 5)
        dense = tiny(images)
    assert tiny.dense_tokens == "trunk" and dense.shape == (2, ARCH.width, 4, 5)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)


def test_head_patch_tokens_are_an_option():
    backbone = create_backbone("dinov3txt-tiny", dense_tokens="head")
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        head = backbone.model.visual_model.head(trunk_tokens(backbone, images))
        dense = backbone(images)
    torch.testing.assert_close(dense, as_grid(head[:, 5:], 3, 4), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense_tokens"):
        create_backbone("dinov3txt-tiny", dense_tokens="cls")


def test_images_off_the_patch_grid_are_stretched_bicubically(tiny):
    """72 x 100 -> bicubic (align_corners=False) to 80 x 112, then the single pass."""
    images = torch.randn(1, 3, 72, 100)
    stretched = F.interpolate(images, size=(80, 112), mode="bicubic", align_corners=False)
    with torch.no_grad():
        dense = tiny(images)
        expected = as_grid(trunk_tokens(tiny, stretched)[:, 5:], 5, 7)
    assert tiny.patch_fit == "stretch" and dense.shape == (1, ARCH.width, 5, 7)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    on_grid = torch.randn(1, 3, 64, 80)
    assert tiny.fit_to_patches(on_grid) is on_grid


def test_zero_padding_is_an_option():
    backbone = create_backbone("dinov3txt-tiny", patch_fit="pad")
    images = torch.randn(1, 3, 72, 100)
    padded = torch.zeros(1, 3, 80, 112)
    padded[..., :72, :100] = images
    with torch.no_grad():
        dense = backbone(images)
        expected = as_grid(trunk_tokens(backbone, padded)[:, 5:], 5, 7)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_fit"):
        create_backbone("dinov3txt-tiny", patch_fit="crop")


def numpy_rope(periods: list[float], rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 2 * head_dim) [sin, cos] of DINOv3's RoPE, in float64 numpy: coordinates
    of cell centres in [-1, 1] per axis, angles 2 pi coord / period, (y, x) per period, tiled
    twice (facebookresearch/dinov3 dinov3/layers/rope_position_encoding.py)."""
    ys = (np.arange(rows) + 0.5) / rows * 2 - 1
    xs = (np.arange(cols) + 0.5) / cols * 2 - 1
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    angles = 2 * math.pi * coords[:, :, None] / np.asarray(periods)[None, None, :]
    angles = np.tile(angles.reshape(len(coords), -1), 2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def test_stored_rope_periods_are_loaded_used_and_kept_through_casts(official_files):
    backbone_path, head_path, _, _ = official_files
    model = create_backbone(
        "dinov3txt-tiny", pretrained="official", backbone_weights=backbone_path, weights=head_path
    )
    rope = lambda: model.model.visual_model.backbone.rope  # noqa: E731 (a cast may rebind it)
    assert rope().periods.tolist() == TINY_BF16_PERIODS
    _, sincos = model.embed(torch.zeros(1, 3, 48, 64))
    expected = torch.from_numpy(numpy_rope(TINY_BF16_PERIODS, 3, 4)).float()
    torch.testing.assert_close(sincos, expected, rtol=0, atol=2e-6)
    model.to(torch.bfloat16)
    assert rope().periods.dtype == torch.float32
    assert rope().periods.tolist() == TINY_BF16_PERIODS
    model.float()
    assert rope().periods.tolist() == TINY_BF16_PERIODS
    assert "model.visual_model.backbone.rope.periods" in model.state_dict()


def test_float32_periods_survive_a_bf16_round_trip():
    """Periods that are not bf16 values (nor timm's schedule) come back from bf16 unchanged."""
    model = create_backbone("dinov3txt-tiny")
    periods = np.array([1.0, 3.1622777, 10.0, 31.622776], dtype=np.float32) * np.float32(1.5)
    model.model.visual_model.backbone.rope.periods.copy_(torch.from_numpy(periods))
    model.to(torch.bfloat16).float()
    assert model.model.visual_model.backbone.rope.periods.tolist() == periods.tolist()


def test_backbone_config_names_the_papers_dense_path_and_overrides_it():
    def backbone(*overrides):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("eval", ["backbone=dinov3txt", *overrides])
        settings = OmegaConf.to_container(cfg, resolve=True)["backbone"]
        return {k: settings[k] for k in ("dense_tokens", "patch_fit")}

    assert backbone() == {"dense_tokens": "trunk", "patch_fit": "stretch"}
    changed = backbone("backbone.dense_tokens=head", "backbone.patch_fit=pad")
    built = create_backbone("dinov3txt-tiny", **changed)
    assert (built.dense_tokens, built.patch_fit) == ("head", "pad")
