"""Refinement stages: the CG solver, LPOSS's patch graph, LPOSS+'s pixel graph, AnyUp."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import anyup_official_shapes, write_anyup_file
from torch import nn

from spar.models.weights import WeightLoadingError
from spar.refine import (
    LPOSS,
    AnyUp,
    PixelGraph,
    SparseGraph,
    check_stage_settings,
    conjugate_gradient,
    knn_patch_graph,
    load_anyup,
    propagate,
)
from spar.refine.colour import rgb_to_lab


def _random_graph(n: int = 12, edges: int = 30, seed: int = 0) -> SparseGraph:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n, (edges,), generator=generator)
    cols = torch.randint(0, n, (edges,), generator=generator)
    weights = torch.rand(edges, generator=generator, dtype=torch.float64)
    return SparseGraph(torch.cat([rows, cols]), torch.cat([cols, rows]), weights.repeat(2), n)


def test_conjugate_gradient_equals_a_dense_solve():
    graph = _random_graph()
    normalized = graph.to_dense()
    assert torch.allclose(normalized, normalized.T)
    assert normalized.diagonal().abs().max() == 0
    system = torch.eye(12, dtype=torch.float64) - 0.95 * normalized
    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.linalg.solve(system, scores.T).T
    solved = conjugate_gradient(
        lambda x: x - 0.95 * graph.matvec(x), scores, tol=1e-12, max_iter=100
    )
    assert torch.allclose(solved, expected, atol=1e-9)
    assert torch.allclose(propagate(graph.matvec, scores, 0.95, 1e-12, 100), expected, atol=1e-9)
    # 50 iterations at tolerance 1e-6 already land close on a small graph (the published
    # budget is 10 iterations: tests/test_refine_published.py)
    assert torch.allclose(propagate(graph.matvec, scores, max_iter=50), expected, atol=1e-4)


def test_knn_patch_graph_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(10, 4, generator=generator, dtype=torch.float64), dim=1)
    positions = 16 * torch.rand(10, 2, generator=generator, dtype=torch.float64)
    k, gamma, sigma = 4, 3.0, 0.01
    similarity = features @ features.T
    kept = torch.zeros(10, 10, dtype=torch.float64)
    for row in range(10):
        for col in similarity[row].topk(k).indices.tolist():
            distance = (positions[row] - positions[col]).norm()
            kept[row, col] = similarity[row, col].clamp_min(0) ** gamma * math.exp(
                -sigma * distance
            )
    weights = kept + kept.T
    weights.fill_diagonal_(0)
    scale = weights.sum(1).rsqrt()
    expected = scale[:, None] * weights * scale[None, :]
    graph = knn_patch_graph(features, positions, k=k, gamma=gamma, sigma=sigma, block_size=3)
    assert torch.allclose(graph.to_dense(), expected)


def test_pixel_graph_neighbourhood_and_weights_on_a_hand_made_5x5_image():
    values = torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 0.5, 1.0, 1.0],
            [0.2, 0.2, 0.5, 1.0, 1.0],
            [0.2, 0.2, 0.5, 1.0, 1.0],
        ]
    )
    colours = torch.stack([values, 2 * values, torch.zeros(5, 5)])  # (3, 5, 5)
    tau = 0.5
    graph = PixelGraph(colours, size=3, tau=tau)
    dense = graph.to_dense()
    for i in range(25):
        for j in range(25):
            (yi, xi), (yj, xj) = divmod(i, 5), divmod(j, 5)
            linked = i != j and abs(yi - yj) <= 1 and abs(xi - xj) <= 1
            distance = (colours[:, yi, xi] - colours[:, yj, xj]).norm()
            expected = torch.exp(-distance / tau) if linked else torch.tensor(0.0)
            assert torch.isclose(dense[i, j], expected, atol=1e-6), (i, j)
    assert int((dense[12] > 0).sum()) == 8 and int((dense[0] > 0).sum()) == 3  # centre, corner
    # the published 13x13 neighbourhood links every pair of a 5x5 image
    assert int((PixelGraph(colours, size=13, tau=10.0).to_dense() > 0).sum()) == 25 * 24
    scores = torch.randn(2, 5, 5)
    scale = dense.sum(1).rsqrt()
    normalized = scale[:, None] * dense * scale[None, :]
    expected = (normalized @ scores.flatten(1).T).T.view(2, 5, 5)
    assert torch.allclose(graph.matvec(scores), expected, atol=1e-5)


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(3, 1, 3)
    lab = rgb_to_lab(rgb)[:, 0].T  # white, black, red
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20]])
    assert torch.allclose(lab, expected, atol=0.05)


class PatchColours(nn.Module):
    """Affinity stand-in: each patch's mean colour, unit norm (two colours -> two clusters)."""

    patch_size = 16

    def forward(self, pixels):
        return F.normalize(F.avg_pool2d(pixels, self.patch_size), dim=1)


def _accuracy(alpha: float, pixel_refine: bool) -> float:
    """LPOSS on a red/blue image with noisy per-patch scores: pixel accuracy of the argmax."""
    height, width = 64, 96
    truth = torch.zeros(height, width, dtype=torch.long)
    truth[:, width // 2 :] = 1
    pixels = torch.stack([1.0 - truth, 0.2 * torch.ones_like(truth), truth.float()]).float()
    generator = torch.Generator().manual_seed(0)

    def features(windows):
        cells = F.avg_pool2d(windows, 16)
        onehot = torch.stack([cells[:, 0], cells[:, 2]], dim=1)
        return onehot + 1.1 * torch.randn(onehot.shape, generator=generator)

    lposs = LPOSS(
        PatchColours(), window=48, stride=16, short_side=None, k=20, alpha=alpha,
        pixel_refine=pixel_refine, neighbourhood=5,
    )  # fmt: skip
    scores = lposs(pixels[None], features, classify=lambda f: f)
    assert scores.shape == (1, 2, height, width)
    return (scores[0].argmax(0) == truth).float().mean().item()


def test_propagation_raises_pixel_accuracy_on_a_two_region_image():
    noisy = _accuracy(alpha=0.0, pixel_refine=False)  # alpha 0: Z = Y, no propagation
    assert noisy < 0.9
    assert _accuracy(alpha=0.95, pixel_refine=False) > noisy + 0.05
    assert _accuracy(alpha=0.95, pixel_refine=True) > noisy + 0.05


def test_anyup_official_names_load_strictly_and_a_missing_key_is_named(tmp_path):
    path = write_anyup_file(tmp_path / "anyup_multi_backbone.pth")
    model = load_anyup(path)
    expected = anyup_official_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.state_dict()["rope.freqs"], state["rope.freqs"])
    del state["cross_decode.conv2d.weight"]
    state["rope.freqs"] = torch.zeros(3, 128)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(WeightLoadingError) as error:
        load_anyup(broken)
    message = str(error.value)
    assert "missing keys: cross_decode.conv2d.weight" in message
    assert "rope.freqs: file (3, 128) vs model (2, 128)" in message
    assert str(broken) in message and "upsample.weights" in message


def test_anyup_output_is_a_convex_mix_of_the_input_features():
    torch.manual_seed(0)
    model = AnyUp(chunk_size=64).eval()
    image = torch.randn(2, 3, 24, 32)
    features = 3 * torch.randn(2, 6, 5, 7) + torch.arange(6.0).view(1, 6, 1, 1)
    with torch.no_grad():
        out = model(image, features)
        model.chunk_size = 10**6
        unchunked = model(image, features)
    assert out.shape == (2, 6, 24, 32)
    low = features.amin(dim=(2, 3), keepdim=True)
    high = features.amax(dim=(2, 3), keepdim=True)
    assert bool(((out >= low - 1e-5) & (out <= high + 1e-5)).all())
    assert out.std() > 0.1  # a real mix, not a constant
    assert torch.allclose(out, unchunked, atol=1e-5)


def test_anyup_windowed_attention_equals_masked_multihead_attention():
    """The banded attention gives the head-averaged weights of the released nn.MultiheadAttention
    with the full window mask (key cell within 0.1 of the image extent around the query)."""
    torch.manual_seed(0)
    block = AnyUp().cross_decode.eval()
    queries, keys = torch.randn(1, 128, 12, 10), torch.randn(1, 128, 4, 5)
    values = torch.randn(1, 3, 4, 5)

    def window(index, queries, keys):
        centre = (index + 0.5) / queries
        return math.floor(max(centre - 0.1, 0) * keys), math.ceil(min(centre + 0.1, 1) * keys)

    blocked = torch.ones(12 * 10, 4 * 5, dtype=torch.bool)
    for y in range(12):
        for x in range(10):
            (r0, r1), (c0, c1) = window(y, 12, 4), window(x, 10, 5)
            for r in range(r0, r1):
                blocked[y * 10 + x, r * 5 + c0 : r * 5 + c1] = False
    with torch.no_grad():
        q = block.cross_attn.norm_q(block.conv2d(queries).flatten(2).transpose(1, 2))
        k = block.cross_attn.norm_k(keys.flatten(2).transpose(1, 2))
        _, weights = block.cross_attn.attention(q, k, k, attn_mask=blocked)
        expected = (weights @ values.flatten(2).transpose(1, 2)).transpose(1, 2).view(1, 3, 12, 10)
        got = block(queries, keys, values, chunk_size=25)
    assert torch.allclose(got, expected, atol=1e-5)


def test_missing_refinement_weights_name_the_file_and_the_key(tmp_path):
    missing = tmp_path / "dino.safetensors"
    refine = {"name": "lposs", "affinity": {"model": "x", "weights": str(missing)}}
    with pytest.raises(FileNotFoundError, match=r"dino\.safetensors.*refine\.affinity\.weights"):
        check_stage_settings(refine, None)
    upsample = {"name": "anyup", "weights": str(tmp_path / "anyup.pth")}
    with pytest.raises(FileNotFoundError, match=r"anyup\.pth.*upsample\.weights"):
        check_stage_settings(None, upsample)
    with pytest.raises(ValueError, match="unknown refine.name 'lpos'"):
        check_stage_settings({"name": "lpos"}, None)
    with pytest.raises(ValueError, match="unknown upsample setting.*chunk"):
        check_stage_settings(None, {"name": "anyup", "weights": "hub", "chunk": 8})


def test_lposs_works_at_its_short_side_and_returns_that_size():
    pixels = torch.rand(1, 3, 48, 64)
    lposs = LPOSS(PatchColours(), window=32, stride=16, short_side=32, k=10)
    scores = lposs(pixels, lambda windows: F.avg_pool2d(windows, 16), classify=lambda f: f)
    assert scores.shape == (1, 3, 32, 43)
    assert lposs.windows(32, 43) == [(0, 0, 32, 32), (0, 11, 32, 43)]


def test_hub_weights_that_cannot_be_fetched_name_the_key(monkeypatch, tmp_path):
    """Offline and not in the cache: the error names the config key and the way around it."""
    import huggingface_hub

    from spar.refine import build

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the local cache")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    refine = {"model": "vit_tiny_patch16_224", "weights": "hub"}
    with pytest.raises(FileNotFoundError, match=r"refine\.affinity\.weights=hub.*local file"):
        build.build_affinity_backbone(refine)
    with pytest.raises(FileNotFoundError, match=r"upsample\.weights=hub.*network unreachable"):
        build.load_anyup("hub")
