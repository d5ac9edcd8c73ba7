"""Dense heads (SCLIP, ClearCLIP, NACLIP) against the published arithmetic, written here in the
authors' own layout (sequence-first tokens, explicit softmax, one head batch per image-head) with
plain torch ops on a tiny block's weights; what each head trains; the teacher cache key.

References: wangf3014/SCLIP clip/model.py @961a11a5 (custom_attn, csa=True),
mc-lan/ClearCLIP open_clip/transformer.py @afe06b8e (custom_attn, model_type='ClearCLIP',
ignore_residual=True), sinahmr/NACLIP clip/model.py @defb7c94 (gaussian_window,
get_attention_addition, custom_attn attn_strategy='naclip', arch='reduced'; gaussian_std=5).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from spar.config import SettingError
from spar.distill.cache import teacher_identity
from spar.models import SlidingWindowTeacher, create_backbone

HEADS = ("sclip", "clearclip", "naclip")


@pytest.fixture(scope="module")
def tiny_heads():
    """One clip-tiny per head (same seed: the same weights)."""
    return {head: create_backbone("clip-tiny", dense_head=head) for head in ("maskclip", *HEADS)}


def layer_norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def gaussian_bias(rows, cols, std):
    """NACLIP's addition by plain loops: exp(-squared patch distance / (2 std^2)) between patch
    tokens, 0 in the class token's row and column."""
    count = rows * cols
    bias = torch.zeros(count + 1, count + 1)
    for p in range(count):
        for r in range(count):
            dy, dx = p // cols - r // cols, p % cols - r % cols
            bias[p + 1, r + 1] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
    return bias


def published_last_block(head, block, x, grid):
    """The authors' last block on (L, B, D) sequence-first tokens -> (L, B, D)."""
    attn = block.attn
    length, batch, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    scale = head_dim**-0.5
    y = layer_norm(block.ln_1, x)
    q, k, v = (y @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(length, batch * heads, head_dim).transpose(0, 1) for t in (q, k, v))
    if head == "sclip":
        weights = torch.softmax(q @ q.transpose(1, 2) * scale, -1) + torch.softmax(
            k @ k.transpose(1, 2) * scale, -1
        )
    elif head == "clearclip":
        weights = torch.softmax(q @ q.transpose(1, 2) * scale, -1)
    else:
        logits = k @ k.transpose(1, 2) * scale + gaussian_bias(*grid, 5.0)
        weights = torch.softmax(logits, -1)
    out = (weights @ v).transpose(0, 1).reshape(length, batch, dim)
    out = out @ attn.out_proj.weight.T + attn.out_proj.bias
    if head != "sclip":
        return out  # ClearCLIP ignore_residual, NACLIP arch='reduced': attention output only
    x = x + out
    mlp = block.mlp
    hidden = mlp.gelu(layer_norm(block.ln_2, x) @ mlp.c_fc.weight.T + mlp.c_fc.bias)
    return x + hidden @ mlp.c_proj.weight.T + mlp.c_proj.bias


def published_features(backbone, head, images):
    """Tokens from the backbone's embedding, earlier blocks by open_clip's own block forward,
    then the published last block, ln_post and proj on every token, class token dropped."""
    visual = backbone.model.visual
    grid = (images.shape[2] // backbone.patch_size, images.shape[3] // backbone.patch_size)
    x = backbone.embed(images)[0]
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)  # open_clip's blocks are batch-first
    x = published_last_block(head, visual.transformer.resblocks[-1], x.transpose(0, 1), grid)
    x = (layer_norm(visual.ln_post, x.transpose(0, 1)) @ visual.proj)[:, 1:]
    return x.transpose(1, 2).reshape(images.shape[0], -1, *grid)


def assert_follows_published(backbone, head, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = published_features(backbone, head, images)
        torch.testing.assert_close(backbone(images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_sclip_follows_the_published_correlative_attention(tiny_heads, size):
    assert_follows_published(tiny_heads["sclip"], "sclip", size)


def test_sclip_keeps_the_residual_and_feed_forward_of_the_last_block(tiny_heads):
    backbone = copy.deepcopy(tiny_heads["sclip"])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(images)
        backbone.blocks[-1].mlp.c_proj.bias.add_(0.5)
        assert not torch.allclose(backbone(images), before)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_clearclip_follows_the_published_query_query_attention(tiny_heads, size):
    assert_follows_published(tiny_heads["clearclip"], "clearclip", size)


def test_clearclip_ignores_the_last_feed_forward_and_the_keys(tiny_heads):
    backbone = copy.deepcopy(tiny_heads["clearclip"])
    images = torch.randn(1, 3, 64, 64)
    dim = backbone.blocks[-1].attn.embed_dim
    with torch.no_grad():
        before = backbone(images)
        backbone.blocks[-1].mlp.c_fc.weight.mul_(3)
        backbone.blocks[-1].ln_2.bias.add_(1)
        backbone.blocks[-1].attn.in_proj_weight[dim : 2 * dim].mul_(-2)  # the k rows
        torch.testing.assert_close(backbone(images), before, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_naclip_follows_the_published_neighbourhood_attention(tiny_heads, size):
    assert_follows_published(tiny_heads["naclip"], "naclip", size)


def test_naclip_bias_is_the_window_gaussian_with_std_5():
    from spar.models.dense_heads import naclip_bias

    torch.testing.assert_close(naclip_bias((3, 5)), gaussian_bias(3, 5, 5.0))
    bias = naclip_bias((2, 2))
    assert bias[0].abs().sum() == 0 and bias[:, 0].abs().sum() == 0
    assert bias[1, 2].item() == pytest.approx(math.exp(-1 / 50))  # neighbours, distance 1
    assert bias[1, 4].item() == pytest.approx(math.exp(-2 / 50))  # diagonal


def test_naclip_ignores_the_last_feed_forward_and_the_queries(tiny_heads):
    backbone = copy.deepcopy(tiny_heads["naclip"])
    images = torch.randn(1, 3, 64, 64)
    dim = backbone.blocks[-1].attn.embed_dim
    with torch.no_grad():
        before = backbone(images)
        backbone.blocks[-1].mlp.c_proj.bias.add_(1)
        backbone.blocks[-1].attn.in_proj_weight[:dim].mul_(-2)  # the q rows
        torch.testing.assert_close(backbone(images), before, rtol=0, atol=0)


def test_maskclip_head_is_the_default_and_unchanged(tiny_heads):
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_heads["maskclip"](images), create_backbone("clip-tiny")(images), rtol=0, atol=0
        )
    assert create_backbone("tiny").dense_head == "maskclip"


@pytest.mark.parametrize("head", HEADS)
def test_every_head_differs_from_maskclip(tiny_heads, head):
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(tiny_heads[head](images), tiny_heads["maskclip"](images))


def block_parameters(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("head", "drops_ffn"), [("sclip", False), ("clearclip", True), ("naclip", True)]
)
def test_sclip_clearclip_naclip_last_two_train_only_what_the_head_runs(head, drops_ffn):
    """``last-2`` trains the second-to-last block whole and the last block without the modules
    the head never runs (ClearCLIP and NACLIP: ln_2 and the MLP), and every trained tensor gets
    a gradient from the dense features."""
    backbone = create_backbone("clip-tiny", dense_head=head, trainable_blocks="last-2").train()
    last = backbone.blocks[-1]
    unused = block_parameters(last.ln_2) + block_parameters(last.mlp) if drops_ffn else 0
    expected = block_parameters(backbone.blocks[-2]) + block_parameters(last) - unused
    assert backbone.num_trainable_parameters() == expected
    assert all(p.requires_grad != drops_ffn for p in last.mlp.parameters())
    backbone(torch.randn(1, 3, 64, 64)).square().mean().backward()
    trained = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)


@pytest.mark.parametrize("name", ["clip-tiny", "tiny"])
def test_an_unknown_dense_head_names_the_setting(name):
    with pytest.raises(SettingError, match="backbone.dense_head 'gem'.*naclip"):
        create_backbone(name, dense_head="gem")


def test_naclip_and_sclip_teacher_cache_keys_differ_and_maskclip_keeps_its_key(tiny_heads):
    """Same weights, other head: other teacher maps, so another cache key; the default head adds
    nothing to the key (caches of the paper's backbones stay valid)."""
    identities = {
        head: teacher_identity(SlidingWindowTeacher(backbone, stride=24))
        for head, backbone in tiny_heads.items()
    }
    assert identities["maskclip"]["weights"] == identities["naclip"]["weights"]
    assert "dense_head" not in identities["maskclip"]
    assert identities["naclip"]["dense_head"] == "naclip"
    assert identities["sclip"]["dense_head"] == "sclip"
    assert len({str(sorted(i.items())) for i in identities.values()}) == 4


def test_naclip_and_sclip_compile_to_one_graph_for_every_image_size():
    """NACLIP's bias is a per-grid input of the compiled blocks, like rotary embeddings: one
    dynamic graph serves every size, with the eager features."""
    from spar.models import compile_backbone

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    try:
        for head in ("naclip", "sclip"):
            graphs.clear()
            eager = create_backbone("clip-tiny-p14", dense_head=head)
            compiled = compile_backbone(copy.deepcopy(eager), True, backend=counting_backend)
            with torch.no_grad():
                for batch, height, width in [(2, 112, 112), (2, 140, 168), (3, 98, 210)]:
                    images = torch.randn(batch, 3, height, width)
                    torch.testing.assert_close(compiled(images), eager(images), rtol=0, atol=0)
            assert len(graphs) == 1, head
    finally:
        torch._dynamo.reset()
