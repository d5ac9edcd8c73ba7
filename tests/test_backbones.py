"""Backbones: registry, shapes at any resolution, reference paths, weights, trainable blocks."""

import copy
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ROOT
from safetensors.torch import save_file

from spar.models import (
    WeightLoadingError,
    backbone_entry,
    create_backbone,
    list_backbones,
    resolve_trainable_blocks,
)
from spar.models.maskclip import maskclip_block
from spar.models.pos_embed import resample_pos_embed_by_scale, resample_pos_embed_to_size
from spar.models.registry import BackboneConfig
from spar.models.siglip2 import map_value_path

# Every registry entry that is random by default runs offline and gets every contract test.
TINY_NAMES = [name for name in list_backbones() if backbone_entry(name).default_pretrained is None]
SIZES = [(224, 224), (64, 96), (320, 176), (100, 150), (33, 17)]


def test_registry_lists_the_families():
    assert set(list_backbones()) >= {"maskclip", "siglip2", "dinov3txt"}
    assert set(TINY_NAMES) >= {"tiny", "siglip2-tiny", "dinov3txt-tiny"}


@pytest.mark.parametrize("name", list_backbones())
def test_every_entry_has_a_complete_config(name):
    """Normalisation, window, sizes; the architecture names a real open_clip model (whose
    default tag exists with the same normalisation) or timm model; pretrained weights carry a
    licence note."""
    config = backbone_entry(name).config
    assert isinstance(config, BackboneConfig) and config.description
    assert len(config.mean) == len(config.std) == 3
    assert all(0 < v < 1 for v in config.mean + config.std)
    assert config.native_size % config.patch_size == 0 and config.embed_dim > 0
    if config.architecture in open_clip.list_models():
        assert config.default_pretrained in open_clip.list_pretrained_tags_by_model(
            config.architecture
        )
        tag = open_clip.get_pretrained_cfg(config.architecture, config.default_pretrained)
        assert (tag["mean"], tag["std"]) == (config.mean, config.std)
    elif config.architecture is not None:
        assert timm.is_model(config.architecture)
    if config.default_pretrained is not None:
        assert config.license


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(KeyError, match="maskclip.*siglip2"):
        create_backbone("resnet50")


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="colour"):
        create_backbone("tiny", colour="red")


@pytest.mark.parametrize("name", TINY_NAMES)
def test_contract_attributes_follow_the_config(tiny_backbones, name):
    backbone, config = tiny_backbones(name), backbone_entry(name).config
    assert backbone.patch_size == config.patch_size
    assert backbone.embed_dim == config.embed_dim
    assert backbone.native_size == (config.native_size, config.native_size)
    assert backbone.mean == config.mean and backbone.std == config.std


@pytest.mark.parametrize("name", TINY_NAMES)
def test_random_init_is_seeded(tiny_backbones, name):
    """The same seed gives the same weights, another seed others; the global RNG is untouched."""
    rng = torch.random.get_rng_state()
    again, other = create_backbone(name), create_backbone(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    shared = tiny_backbones(name).state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in again.state_dict().items())
    assert not all(torch.equal(v, shared[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("size", SIZES)
def test_any_resolution_gives_the_patch_grid(tiny_backbones, name, size):
    backbone = tiny_backbones(name)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = backbone(images)
    patch = backbone.patch_size
    grid = (math.ceil(size[0] / patch), math.ceil(size[1] / patch))
    assert features.shape == (2, backbone.embed_dim, *grid)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_sizes_off_the_patch_multiple_follow_the_backbones_patch_fit(tiny_backbones, name):
    """The single pass fits a 100x150 image to the 16-px grid as the SPAR authors' wrapper of
    that family does: zero padding to 112x160 (MaskCLIP path, SigLIP2: the forward's own
    grid) or a bicubic stretch to 112x160 (DINOv3.txt, naomikombol/SPAR
    models/model_dinov3txt.py)."""
    backbone = tiny_backbones(name)
    images = torch.randn(1, 3, 100, 150)
    # 112x160 on the 16-px grid, 112x154 on the 14-px grid (clip-tiny-p14).
    fitted_size = {16: (112, 160), 14: (112, 154)}[backbone.patch_size]
    if backbone.patch_fit == "stretch":
        fitted = F.interpolate(images, size=fitted_size, mode="bicubic", align_corners=False)
    else:
        fitted = F.pad(images, (0, fitted_size[1] - 150, 0, fitted_size[0] - 100))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), backbone(fitted), rtol=0, atol=0)
    expected = {"tiny": "truncate", "siglip2-tiny": "pad", "dinov3txt-tiny": "stretch"}
    assert backbone.patch_fit == expected.get(name, backbone.patch_fit)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_encode_text_shape(tiny_backbones, name):
    backbone = tiny_backbones(name)
    embeddings = backbone.encode_text(["a photo of a cat", "sky", "road"])
    assert embeddings.shape == (3, backbone.embed_dim)
    with pytest.raises(ValueError, match="at least one"):
        backbone.encode_text([])


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(3, 64, 64),
        torch.randn(1, 4, 64, 64),
        torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
    ],
)
def test_bad_images_are_rejected(tiny_backbones, name, bad):
    with pytest.raises(ValueError, match="images"):
        tiny_backbones(name)(bad)


def _maskclip_reference(model, images):
    """MaskCLIP features built from open_clip's own token path up to the last block."""
    visual = model.visual
    depth = len(visual.transformer.resblocks)
    out = visual.forward_intermediates(
        images,
        indices=[depth - 2],
        output_fmt="NLC",
        intermediates_only=True,
        output_extra_tokens=True,
    )
    tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], 1)
    x = maskclip_block(visual.transformer.resblocks[-1], tokens)
    x = visual.ln_post(x[:, 1:]) @ visual.proj
    grid = (images.shape[2] // 16, images.shape[3] // 16)
    return x.transpose(1, 2).reshape(images.shape[0], -1, *grid)


def test_maskclip_at_native_size_follows_open_clip_tokens(tiny_backbone):
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = _maskclip_reference(tiny_backbone.model, images)
        torch.testing.assert_close(tiny_backbone(images), expected, rtol=1e-5, atol=1e-5)


def test_maskclip_off_native_size_uses_dino_scale_factor_resampling(tiny_backbone):
    """open_clip run with its position table replaced by the DINO-convention resampling."""
    model = copy.deepcopy(tiny_backbone.model)
    pos = model.visual.positional_embedding.data
    source, target = (14, 14), (20, 11)
    scale = ((20 + 0.1) / 14, (11 + 0.1) / 14)
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == target
    model.visual.positional_embedding.data = torch.cat([pos[:1], grid.flatten(2)[0].T])
    images = torch.randn(1, 3, 320, 176)
    with torch.no_grad():
        expected = _maskclip_reference(model, images)
        torch.testing.assert_close(tiny_backbone(images), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        resample_pos_embed_by_scale(pos[1:], source, target),
        resample_pos_embed_to_size(pos[1:], source, target),
    ), "the scale-factor convention must differ from resampling to a size"


def test_maskclip_value_path_is_attention_with_a_single_key(tiny_backbone):
    block = tiny_backbone.blocks[-1]
    tokens = torch.randn(5, 1, tiny_backbone.model.visual.transformer.width)
    with torch.no_grad():
        torch.testing.assert_close(maskclip_block(block, tokens), block(tokens))


def test_siglip2_at_native_size_follows_timm_trunk(tiny_siglip2):
    trunk = tiny_siglip2.trunk
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens = trunk.forward_features(images)
        expected = map_value_path(trunk.attn_pool, tokens).transpose(1, 2).reshape(2, -1, 8, 8)
        torch.testing.assert_close(tiny_siglip2(images), expected, rtol=1e-5, atol=1e-5)


def test_siglip2_value_path_is_the_pool_with_a_single_key(tiny_siglip2):
    pool = tiny_siglip2.trunk.attn_pool
    tokens = torch.randn(3, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(map_value_path(pool, tokens), pool(tokens)[:, None])


@pytest.mark.parametrize(
    ("name", "native", "dim", "context"), [("maskclip", 224, 512, 77), ("siglip2", 512, 768, 64)]
)
def test_real_architectures_build_and_run(name, native, dim, context):
    """The real configurations, randomly initialised, with an injected offline tokenizer."""
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.randint(1, 1000, (len(texts), context))

    config = backbone_entry(name).config
    assert (config.native_size, config.embed_dim) == (native, dim)
    backbone = create_backbone(name, pretrained=None, tokenizer=tokenizer)
    assert backbone.native_size == (native, native)
    assert backbone.embed_dim == dim and backbone.patch_size == config.patch_size
    if name == "maskclip":
        assert backbone.model.visual.image_size == (native, native)
    else:
        assert backbone.trunk.patch_embed.img_size == (native, native)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 240, 320)).shape == (1, dim, 15, 20)
        assert backbone.encode_text(["a cat", "a dog"]).shape == (2, dim)
    assert seen == ["a cat", "a dog"]


# --- weights ----------------------------------------------------------------------------------


def _outputs(backbone):
    with torch.no_grad():
        return backbone(torch.ones(1, 3, 64, 80) * 0.3), backbone.encode_text(["a cat"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_from_a_local_file(tmp_path, tiny_backbone, suffix):
    state = tiny_backbone.model.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = create_backbone("tiny", pretrained=str(path), seed=123)
    fresh = create_backbone("tiny", pretrained=None, seed=123)
    for got, want in zip(_outputs(loaded), _outputs(tiny_backbone), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(_outputs(fresh)[0], _outputs(tiny_backbone)[0])


def test_missing_weight_file_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightLoadingError, match="nope.safetensors"):
        create_backbone("tiny", pretrained=str(missing))


def test_weight_keys_that_do_not_fit_are_named(tmp_path, tiny_backbone):
    state = dict(tiny_backbone.model.state_dict())
    state.pop("visual.proj")
    state["visual.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightLoadingError, match=r"missing keys: visual\.proj") as error:
        create_backbone("tiny", pretrained=str(path))
    assert "visual.extra_head.weight" in str(error.value)


def test_weight_shapes_that_do_not_fit_are_named(tmp_path):
    wide = create_backbone("tiny", width=96)
    path = tmp_path / "wide.pt"
    torch.save(wide.model.state_dict(), path)
    expected = (
        r"shape mismatches: .*token_embedding\.weight: file \(49408, 96\) vs model \(49408, 64\)"
    )
    with pytest.raises(WeightLoadingError, match=expected):
        create_backbone("tiny", pretrained=str(path))


def test_unreadable_weight_file_is_named(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadingError, match="garbage.pt"):
        create_backbone("tiny", pretrained=str(path))


def test_unknown_pretrained_tag_lists_the_known_tags():
    with pytest.raises(ValueError, match="laion2b_s34b_b88k"):
        create_backbone("maskclip", pretrained="imagenet-best")


@pytest.fixture
def tag_downloads(monkeypatch, tmp_path):
    """open_clip's tag download stubbed: every tag 'downloads' an unreadable file; returns it."""
    from spar.models import open_clip_common

    path = tmp_path / "open_clip_model.bin"
    path.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(open_clip_common, "download_pretrained", lambda cfg: str(path))
    return path


def test_a_tags_file_is_read_by_spars_reader(tag_downloads):
    """Tag weights go through read_weight_file (whose error names the file), before any model
    is built."""
    with pytest.raises(WeightLoadingError, match="never runs code") as error:
        create_backbone("maskclip")
    assert str(tag_downloads) in str(error.value)


def test_quick_gelu_tags_warn_as_open_clip_does(tag_downloads):
    with pytest.warns(UserWarning, match="'openai' was trained with QuickGELU"):
        with pytest.raises(WeightLoadingError):
            create_backbone("maskclip", pretrained="openai")


def test_a_failed_tag_download_names_the_tag(monkeypatch):
    from spar.models import open_clip_common

    def offline(cfg):
        raise FileNotFoundError("the hub is offline")

    monkeypatch.setattr(open_clip_common, "download_pretrained", offline)
    with pytest.raises(WeightLoadingError, match="'webli' weights of open_clip.*offline"):
        create_backbone("siglip2")


# --- trainable blocks -------------------------------------------------------------------------


def _block_params(backbone, indices):
    return sum(p.numel() for i in indices for p in backbone.blocks[i].parameters())


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize(
    ("spec", "indices"),
    [
        ("last-2", [2, 3]),
        ("last-1", [3]),
        (3, [1, 2, 3]),
        ("all", [0, 1, 2, 3]),
        ([0, -1], [0, 3]),
        ("none", []),
    ],
)
def test_trainable_blocks_counted(name, spec, indices):
    backbone = create_backbone(name, trainable_blocks=spec)
    assert backbone.num_trainable_parameters() == _block_params(backbone, indices)
    trainable = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable <= {"model"}


def test_notebook_default_trains_nothing_and_training_configs_train_the_last_two(tiny_backbone):
    assert tiny_backbone.num_trainable_parameters() == 0  # inference builds no autograd graph
    trained = create_backbone("tiny", trainable_blocks="last-2")
    assert trained.num_trainable_parameters() == _block_params(trained, [2, 3])
    for name in ("tiny", "maskclip", "siglip2", "dinov3txt"):
        text = (ROOT / "spar" / "configs" / "backbone" / f"{name}.yaml").read_text()
        assert "trainable_blocks: last-2" in text, name


@pytest.mark.parametrize("spec", ["last-5", "first-2", [4], [-5], "lastN", True])
def test_bad_trainable_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        resolve_trainable_blocks(spec, depth=4)


def test_trained_blocks_receive_gradients():
    backbone = create_backbone("tiny", trainable_blocks="last-1")
    backbone(torch.randn(1, 3, 64, 64)).square().mean().backward()
    grads = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert grads and all(".resblocks.3." in n for n in grads)
