"""Position embeddings: bicubic resampling as interpolation matrices, and the resampled-table
cache; the MaskCLIP blocks' batch-first attention."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from spar.models import create_backbone
from spar.models.maskclip import batch_first_attention
from spar.models.pos_embed import (
    DINO_SCALE_OFFSET,
    ResampledPositions,
    interpolation_matrix,
    resample_pos_embed_by_scale,
    resample_pos_embed_to_size,
)

CONVENTIONS = {"scale": resample_pos_embed_by_scale, "size": resample_pos_embed_to_size}
# Up, down, mixed, non-square, a single row, and both families' grids at 672x896.
GRIDS = [
    ((14, 14), (20, 11)),
    ((8, 8), (5, 13)),
    ((14, 14), (64, 48)),
    ((7, 5), (1, 30)),
    ((14, 14), (3, 2)),
    ((14, 14), (42, 56)),
    ((32, 32), (42, 56)),
]
SIZES = [(320, 176), (64, 96), (100, 150), (672, 896)]


def interpolate_reference(
    table: torch.Tensor, source, target, convention: str, dtype=torch.float32
) -> torch.Tensor:
    """``F.interpolate`` bicubic without antialiasing, computed in ``dtype``, cast back: with
    float32 this is what both conventions computed before the matrices."""
    if tuple(source) == tuple(target):
        return table
    if convention == "size":
        size_or_scale = {"size": tuple(target)}
    else:
        scale = tuple((t + DINO_SCALE_OFFSET) / s for t, s in zip(target, source, strict=True))
        size_or_scale = {"scale_factor": scale}
    grid = table.to(dtype).reshape(1, *source, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, mode="bicubic", align_corners=False, antialias=False, **size_or_scale
    )
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def _table(source, channels=24, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(source[0] * source[1], channels, generator=generator).to(dtype)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(("source", "target"), GRIDS)
def test_matrices_are_pytorchs_bicubic(source, target, convention):
    """In float64 the weights are PyTorch's exactly; a float32 table is rounded once, closer to
    the exact values than PyTorch's own kernel, whose source coordinates are float32."""
    resample = CONVENTIONS[convention]
    table = _table(source, dtype=torch.float64)
    exact = interpolate_reference(table, source, target, convention, torch.float64)
    torch.testing.assert_close(resample(table, source, target), exact, rtol=0, atol=1e-12)
    ours = resample(table.float(), source, target)
    assert ours.dtype == torch.float32 and ours.shape == (target[0] * target[1], 24)
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=1e-6)
    before = interpolate_reference(table.float(), source, target, convention)
    torch.testing.assert_close(ours, before, rtol=0, atol=3e-5)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize(("source", "target"), GRIDS[:4])
def test_bfloat16_tables_are_resampled_in_float32(source, target, convention):
    """A bf16 table is resampled in float64 (before: float32) and rounded once."""
    resample = CONVENTIONS[convention]
    table = _table(source, dtype=torch.bfloat16)
    ours = resample(table, source, target)
    assert ours.dtype == torch.bfloat16
    reference = interpolate_reference(table.float(), source, target, convention)
    torch.testing.assert_close(ours.float(), reference, rtol=1.6e-2, atol=1e-2)
    before = interpolate_reference(table, source, target, convention)
    torch.testing.assert_close(ours, before, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_autocast_does_not_lower_the_resampling_precision(convention):
    resample = CONVENTIONS[convention]
    table = _table((8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = resample(table, (8, 8), (5, 13))
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, resample(table, (8, 8), (5, 13)), rtol=0, atol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_resampling_is_differentiable_like_interpolate(convention):
    """A trainable table gets the gradient ``upsample_bicubic2d``'s backward would give it."""
    resample = CONVENTIONS[convention]
    source, target = (7, 5), (9, 12)
    weights = torch.randn(target[0] * target[1], 6, dtype=torch.float64)
    gradients = []
    for function in (resample, lambda t, s, g: interpolate_reference(t, s, g, convention, t.dtype)):
        table = _table(source, channels=6, dtype=torch.float64).requires_grad_(True)
        (function(table, source, target) * weights).sum().backward()
        gradients.append(table.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=1e-12)


def test_the_native_grid_keeps_the_table_unchanged():
    table = _table((14, 14))
    assert resample_pos_embed_by_scale(table, (14, 14), (14, 14)) is table
    assert resample_pos_embed_to_size(table, (14, 14), (14, 14)) is table


def test_the_conventions_differ_and_neither_antialiases():
    table = _table((8, 8))
    by_scale = resample_pos_embed_by_scale(table, (8, 8), (5, 13))
    to_size = resample_pos_embed_to_size(table, (8, 8), (5, 13))
    assert not torch.allclose(by_scale, to_size)
    antialiased = resample_abs_pos_embed(table[None], (5, 13), (8, 8), 0, "bicubic", True)[0]
    assert not torch.allclose(to_size, antialiased)


def test_a_table_of_the_wrong_length_is_named():
    with pytest.raises(ValueError, match="expected 8x8=64"):
        resample_pos_embed_to_size(_table((7, 9)), (8, 8), (5, 13))


def test_interpolation_matrices_are_cached_per_size_and_device():
    cpu = torch.device("cpu")
    matrix = interpolation_matrix(14, 20, 14 / 20, cpu)
    assert matrix.shape == (20, 14) and matrix.dtype == torch.float64
    assert interpolation_matrix(14, 20, 14 / 20, cpu) is matrix
    assert interpolation_matrix(14, 20, 14 / 21, cpu) is not matrix
    assert interpolation_matrix(14, 20, 14 / 20, torch.device("meta")).device.type == "meta"
    torch.testing.assert_close(matrix.sum(1), torch.ones(20, dtype=torch.float64))


# -- the resampled-table cache -----------------------------------------------------------------


def _positions(prefix: int = 1) -> tuple[ResampledPositions, torch.nn.Parameter]:
    table = torch.nn.Parameter(torch.randn(prefix + 64, 16), requires_grad=False)
    return ResampledPositions(resample_pos_embed_by_scale, num_prefix_tokens=prefix), table


def _expected(table: torch.Tensor, target, prefix: int = 1) -> torch.Tensor:
    grid = resample_pos_embed_by_scale(table[prefix:].detach(), (8, 8), target)
    return torch.cat([table[:prefix].detach(), grid])


def test_a_frozen_table_is_resampled_once_per_grid_and_dtype():
    positions, table = _positions()
    first = positions(table, (8, 8), (5, 13), torch.float32)
    torch.testing.assert_close(first, _expected(table, (5, 13)), rtol=0, atol=0)
    assert positions(table, (8, 8), (5, 13), torch.float32) is first
    half = positions(table, (8, 8), (5, 13), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, first.to(torch.bfloat16))
    assert positions(table, (8, 8), (6, 13), torch.float32).shape == (1 + 78, 16)
    assert positions(table, (8, 8), (5, 13), torch.float32) is first


@pytest.mark.parametrize(
    "change",
    ["load_state_dict", "in_place", "optimizer_step", "replaced_data"],
)
def test_the_cache_follows_changes_of_the_table(change):
    module = torch.nn.Module()
    module.table = torch.nn.Parameter(torch.randn(1 + 64, 16), requires_grad=False)
    positions = ResampledPositions(resample_pos_embed_by_scale, num_prefix_tokens=1)
    stale = positions(module.table, (8, 8), (5, 13), torch.float32)
    if change == "load_state_dict":
        module.load_state_dict({"table": torch.randn(1 + 64, 16)})
    elif change == "in_place":
        with torch.no_grad():
            module.table.mul_(2)
    elif change == "optimizer_step":
        module.table.requires_grad_(True)
        module.table.grad = torch.ones_like(module.table)
        torch.optim.SGD([module.table], lr=0.5).step()
        module.table.requires_grad_(False)
    else:
        module.table.data = torch.randn(1 + 64, 16)
    fresh = positions(module.table, (8, 8), (5, 13), torch.float32)
    assert fresh is not stale
    torch.testing.assert_close(fresh, _expected(module.table, (5, 13)), rtol=0, atol=0)


def test_a_trainable_table_is_resampled_with_a_graph_at_every_call():
    positions, table = _positions()
    table.requires_grad_(True)
    first = positions(table, (8, 8), (5, 13), torch.float32)
    assert first.requires_grad and positions(table, (8, 8), (5, 13), torch.float32) is not first
    first.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    with torch.no_grad():
        frozen = positions(table, (8, 8), (5, 13), torch.float32)
        assert positions(table, (8, 8), (5, 13), torch.float32) is frozen


def test_inference_mode_tables_serve_training_and_inference_mode_weights_are_not_cached():
    """A table made in inference mode is an inference tensor: only added to the tokens, never
    saved for backward. Weights made in inference mode have no version counter."""
    backbone = create_backbone("tiny", trainable_blocks="all")
    images = torch.randn(1, 3, 96, 160)
    with torch.inference_mode():
        backbone(images)
    backbone(images).sum().backward()
    assert backbone.blocks[0].mlp.c_fc.weight.grad is not None
    with torch.inference_mode():
        built_there = create_backbone("siglip2-tiny")
        torch.testing.assert_close(built_there(images), create_backbone("siglip2-tiny")(images))


def test_the_cache_keeps_the_most_recent_tables():
    positions, table = _positions()
    positions.max_tables = 2
    first = positions(table, (8, 8), (5, 5), torch.float32)
    positions(table, (8, 8), (6, 6), torch.float32)
    assert positions(table, (8, 8), (5, 5), torch.float32) is first  # now the most recent
    positions(table, (8, 8), (7, 7), torch.float32)  # evicts (6, 6)
    assert positions(table, (8, 8), (5, 5), torch.float32) is first
    assert len(positions._tables) == 2


# -- the backbones -----------------------------------------------------------------------------


def _with_reference_resampling(name: str, convention: str):
    """A fresh backbone whose table is resampled by ``F.interpolate`` in float64, rounded once."""
    backbone = create_backbone(name)

    def resample(table, source, target):
        return interpolate_reference(table, source, target, convention, torch.float64)

    backbone.positions.resample = resample
    return backbone


@pytest.mark.parametrize(("name", "convention"), [("tiny", "scale"), ("siglip2-tiny", "size")])
def test_backbone_features_are_those_of_interpolate_resampling(tiny_backbones, name, convention):
    backbone, reference = tiny_backbones(name), _with_reference_resampling(name, convention)
    for size in SIZES:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = reference(images)
            features = backbone(images)
            torch.testing.assert_close(features, backbone(images), rtol=0, atol=0)  # cached
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("name", ["tiny", "siglip2-tiny"])
def test_loading_weights_reaches_the_next_forward(name):
    backbone, other = create_backbone(name), create_backbone(name, seed=1)
    images = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        backbone(images)
        backbone.load_state_dict(other.state_dict())
        torch.testing.assert_close(backbone(images), other(images), rtol=0, atol=0)


def _profiled_names(backbone, images) -> set[str]:
    with torch.no_grad(), torch.profiler.profile() as profile:
        backbone(images)
    return {event.name for event in profile.events()}


@pytest.mark.parametrize("name", ["tiny", "siglip2-tiny"])
def test_no_bicubic_upsampling_and_no_resampling_after_the_first_forward(name):
    backbone = create_backbone(name)
    images = torch.randn(4, 3, 96, 160)  # not the native size
    first, second = _profiled_names(backbone, images), _profiled_names(backbone, images)
    assert "aten::upsample_bicubic2d" not in first | second
    assert "aten::einsum" in first and "aten::einsum" not in second


def test_maskclip_projections_run_on_contiguous_tokens():
    """No linear on a sequence-first view (which runs as ``aten::bmm``, one matmul a token)."""
    backbone = create_backbone("tiny")
    images = torch.randn(4, 3, 96, 160)
    _profiled_names(backbone, images)
    assert "aten::bmm" not in _profiled_names(backbone, images)


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_first_attention_is_the_blocks_multihead_attention(tiny_backbone, batch):
    attn = tiny_backbone.blocks[0].attn
    tokens = torch.randn(batch, 29, attn.embed_dim)
    with torch.no_grad():
        expected = attn(tokens, tokens, tokens, need_weights=False)[0]
        torch.testing.assert_close(batch_first_attention(attn, tokens), expected)


@pytest.mark.parametrize("name", ["tiny", "siglip2-tiny"])
def test_training_steps_at_batch_1_and_2_run_no_bmm_and_no_resample(tiny_backbones, name):
    """The H100 profile of the old code had fp32 cached training slower at batch 2 than at batch
    1, with linears on sequence-first views running as ``aten::bmm`` once the batch exceeds 1;
    the training step (forward and backward) now runs neither that nor the resample."""
    import copy

    from spar.distill import OptimSettings, StudentOptimizer

    student = copy.deepcopy(tiny_backbones(name)).train()
    student.set_trainable_blocks("last-2")
    update = StudentOptimizer(
        student, OptimSettings(lr=1e-9), device=torch.device("cpu"), total_steps=1, precision="fp32"
    )
    for batch in (1, 2):
        images = torch.randn(batch, 3, 96, 128)
        targets = torch.randn_like(student(images).detach())
        update.train_step(images, targets)
        with torch.profiler.profile() as profile:
            update.train_step(images, targets)
        names = {event.name for event in profile.events()}
        assert not names & {"aten::bmm", "aten::upsample_bicubic2d"}, (batch, names)
