"""spar.refine against the published code's arithmetic, with expected values computed here.

- AnyUp's feature unification (wimmerth/anyup ``anyup/layers/feature_unification.py``): the
  grouped convolution's C x bases responses, read as a (bases, C) grid, softmax over the bases
  axis of that grid, mean over its C axis; chunked and in one piece.
- LPOSS's solver (vladan-stojnic/LPOSS ``lposs_eval.py``, ``dfs_search(tol=1e-6, maxiter=10)``
  with CuPy's ``cg``: stop once ``||r|| <= tol ||b||``): a textbook CG in numpy.
- LPOSS's input in evaluation: the original image resized once to fit (2048, 448).
"""

import numpy as np
import pytest
import torch
from helpers import eval_config, write_benchmark
from omegaconf import OmegaConf

from spar.data.images import load_image, resize_to_fit
from spar.evaluation import run_evaluation
from spar.refine import LPOSS, propagate
from spar.refine.anyup import _FeatureUnification


def _unification_as_released(features: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(B, C, h, w), (bases, 1, k, k) float64 -> (B, bases, h, w), written out in loops.

    Response ``f = c * bases + m``: channel c cross-correlated with basis m (zero padding),
    divided by the number of kernel taps inside the image. Those C * bases responses are read
    as a (bases, C) grid (row-major), softmax along the bases axis, mean along the C axis.
    """
    batch, channels, height, width = features.shape
    bases, _, kernel, _ = basis.shape
    pad = kernel // 2
    padded = np.pad(features, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    inside = np.pad(np.ones((height, width)), pad)
    responses = np.zeros((batch, channels * bases, height, width))
    for c in range(channels):
        for m in range(bases):
            for y in range(height):
                for x in range(width):
                    window = padded[:, c, y : y + kernel, x : x + kernel]
                    taps = inside[y : y + kernel, x : x + kernel].sum()
                    value = (window * basis[m, 0]).sum(axis=(1, 2)) / taps
                    responses[:, c * bases + m, y, x] = value
    grid = responses.reshape(batch, bases, channels, height, width)
    grid = np.exp(grid - grid.max(axis=1, keepdims=True))
    return (grid / grid.sum(axis=1, keepdims=True)).mean(axis=2)


@pytest.mark.parametrize(("channels", "bases"), [(3, 4), (6, 4), (5, 2)])
@pytest.mark.parametrize("channel_chunk", [1, 2, 64])
def test_feature_unification_follows_the_released_layout(channels, bases, channel_chunk):
    generator = torch.Generator().manual_seed(channels * 10 + bases)
    features = torch.randn(2, channels, 4, 5, generator=generator)
    unification = _FeatureUnification(bases=bases, kernel=3)
    with torch.no_grad():
        unification.basis.copy_(torch.randn(bases, 1, 3, 3, generator=generator))
        out = unification(features, channel_chunk=channel_chunk)
    expected = _unification_as_released(
        features.double().numpy(), unification.basis.detach().double().numpy()
    )
    assert out.shape == (2, bases, 4, 5)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_feature_unification_chunked_equals_one_piece():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(1, 37, 6, 7, generator=generator)
    unification = _FeatureUnification(bases=16, kernel=5)
    with torch.no_grad():
        whole = unification(features, channel_chunk=1000)
        for chunk in (1, 5, 16, 36):
            torch.testing.assert_close(
                unification(features, channel_chunk=chunk), whole, rtol=1e-5, atol=1e-7
            )


def _textbook_cg(matrix: np.ndarray, rhs: np.ndarray, tol: float, iterations: int) -> np.ndarray:
    """CG from x = 0 for one right-hand side; stops after ``iterations`` or once
    ``||r|| <= tol * ||b||`` (checked after each iteration, as CuPy's ``cg``)."""
    x = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    threshold = tol * np.linalg.norm(rhs)
    for _ in range(iterations):
        product = matrix @ direction
        step = (residual @ residual) / (direction @ product)
        x = x + step * direction
        new_residual = residual - step * product
        if np.linalg.norm(new_residual) <= threshold:
            break
        direction = new_residual + (new_residual @ new_residual) / (residual @ residual) * direction
        residual = new_residual
    return x


def _propagation_system(n: int = 60, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Wn = D^-1/2 W D^-1/2 of a random-weighted ring (each node linked to the next two; slow
    to mix, so CG is far from converged after 10 iterations), and Y (2, n)."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((n, n))
    for node in range(n):
        for step in (1, 2):
            weights[node, (node + step) % n] = rng.random() + 0.1
    weights = weights + weights.T
    degree = weights.sum(axis=1)
    normalized = weights / np.sqrt(degree[:, None] * degree[None, :])
    return normalized, rng.standard_normal((2, n))


def test_propagation_defaults_run_the_published_ten_cg_iterations():
    normalized, scores = _propagation_system()
    system = np.eye(len(normalized)) - 0.95 * normalized
    ten = np.stack([_textbook_cg(system, y, 1e-6, 10) for y in scores])
    fifty = np.stack([_textbook_cg(system, y, 1e-6, 50) for y in scores])
    assert np.abs(ten - fifty).max() > 1e-3 * np.abs(fifty).max()  # the count matters here
    matrix = torch.from_numpy(normalized)
    solved = propagate(lambda x: (matrix @ x.T).T, torch.from_numpy(scores)).numpy()
    np.testing.assert_allclose(solved, ten, rtol=0, atol=1e-10 * np.abs(ten).max())


def test_propagation_tolerance_is_relative_to_the_right_hand_side():
    normalized, scores = _propagation_system(seed=4)
    scores = scores * np.array([[1e3], [1e-3]])  # a relative rule stops both at the same step
    system = np.eye(len(normalized)) - 0.95 * normalized
    expected = np.stack([_textbook_cg(system, y, 1e-3, 50) for y in scores])
    matrix = torch.from_numpy(normalized)
    solved = propagate(lambda x: (matrix @ x.T).T, torch.from_numpy(scores), tol=1e-3, max_iter=50)
    for row, want in zip(solved.numpy(), expected, strict=True):
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_lposs_defaults_are_the_published_solver_and_input_size():
    lposs = LPOSS(torch.nn.Identity())
    config = OmegaConf.to_container(eval_config("refine=lposs").refine)  # as Hydra composes it
    for settings in (vars(lposs), config):
        assert settings["max_iter"] == 10
        assert settings["tol"] == 1e-6
        assert (settings["long_side"], settings["short_side"]) == (2048, 448)


def test_eval_gives_lposs_the_original_image_resized_once(tmp_path, monkeypatch):
    """The original (300 x 500) is resized once to fit (2048, 448), not the 64x48-bounded one."""
    write_benchmark("voc21", tmp_path / "voc", count=1, size=(300, 500))
    received = []

    def record_and_skip(self, pixels, features, classify, to_pixels, patch_size):
        received.append(pixels.clone())
        classes = classify(features(pixels[..., :32, :32])).shape[1]
        return pixels.new_zeros(1, classes, *pixels.shape[-2:])

    monkeypatch.setattr(LPOSS, "_one_image", record_and_skip)
    cfg = eval_config(
        "dataset=voc21",
        f"dataset.root={tmp_path / 'voc'}",
        "dataset.bounds=[64,48]",
        "refine=lposs",
        "refine.affinity.weights=null",
        "refine.affinity.options={embed_dim:32,depth:1,num_heads:2}",
        "refine.affinity.model=vit_tiny_patch16_224",
    )
    run_evaluation(cfg, tmp_path / "eval")
    # mmcv rescale_size: scale = min(2048 / 500, 448 / 300); sides int(side * scale + 0.5)
    assert [tuple(p.shape[-2:]) for p in received] == [(448, 747)]
    original = load_image(next((tmp_path / "voc" / "JPEGImages").glob("*.jpg")))
    expected = resize_to_fit(original, (2048, 448))
    torch.testing.assert_close(received[0][0], expected, rtol=0, atol=1e-6)
