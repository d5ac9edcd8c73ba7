"""Graphs and the linear solver behind label propagation, in plain torch.

Label propagation solves ``(I - alpha * Wn) Z = Y`` for every class column of ``Y``, where
``Wn = D^-1/2 W D^-1/2`` is the symmetrically normalised affinity matrix of a graph (``W``
symmetric, no self loops, ``D`` its degrees). Two graphs are built here:

- :func:`knn_patch_graph`: a kNN graph over feature vectors (blocked inner products and
  ``topk``; no faiss), edge weight ``max(sim, 0)^gamma * exp(-sigma * distance)``, made
  symmetric; a sparse matrix.
- :class:`PixelGraph`: every pixel linked to its ``size x size`` neighbourhood, weights from
  colour differences, applied as a stencil of shifted images (no index tensors, so the memory
  is ``size^2`` weight maps of the image).

:func:`conjugate_gradient` solves the system for many right-hand sides at once, each column
stopping at its own tolerance, as SciPy/CuPy's ``cg`` does per column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(
    matvec: MatVec,
    rhs: torch.Tensor,
    initial: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 10,
) -> torch.Tensor:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Args:
        matvec: ``x -> A x`` for tensors shaped like ``rhs``.
        rhs: (M, ...) float, M right-hand sides (one per class), each solved on its own.
        initial: starting guess shaped like ``rhs`` (default zeros).
        tol: a column stops once ``||b - A x|| <= tol * ||b||``, checked after every iteration
            (relative to ``||b||``, as CuPy's ``cg(tol=...)`` and SciPy's ``cg(rtol=...)``).
        max_iter: at most this many iterations. The published LPOSS code solves with
            ``tol=1e-6, maxiter=10`` (vladan-stojnic/LPOSS ``segmentation/evaluation/
            lposs_eval.py``, ``dfs_search``, commit e489a7445528922ddfe4e39631ef2fe34827c873),
            for patches and for pixels alike: 10 is the default.

    Returns:
        (M, ...) the solutions, in ``rhs``'s dtype and device.
    """
    dims = tuple(range(1, rhs.ndim))
    shape = (-1,) + (1,) * (rhs.ndim - 1)
    x = torch.zeros_like(rhs) if initial is None else initial.clone()
    residual = rhs - matvec(x) if initial is not None else rhs.clone()
    direction = residual.clone()
    squared = residual.square().sum(dims)
    threshold = tol * torch.linalg.vector_norm(rhs, dim=dims)
    active = squared.sqrt() > threshold
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        product = matvec(direction)
        curvature = (direction * product).sum(dims)
        step = torch.where(active, squared / curvature.clamp_min(1e-30), 0.0)
        x = x + step.view(shape) * direction
        residual = residual - step.view(shape) * product
        new_squared = residual.square().sum(dims)
        active = active & (new_squared.sqrt() > threshold)
        beta = torch.where(active, new_squared / squared.clamp_min(1e-30), 0.0)
        direction = residual + beta.view(shape) * direction
        squared = new_squared
    return x


def propagate(
    normalized_matvec: MatVec,
    scores: torch.Tensor,
    alpha: float = 0.95,
    tol: float = 1e-6,
    max_iter: int = 10,
) -> torch.Tensor:
    """Label propagation: solve ``(I - alpha * Wn) Z = Y`` by :func:`conjugate_gradient`.

    Args:
        normalized_matvec: ``x -> Wn x`` for tensors shaped like ``scores``.
        scores: (M, ...) float32 initial scores Y, one slice per class.

    Returns:
        (M, ...) float32 propagated scores Z.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return conjugate_gradient(
        lambda x: x - alpha * normalized_matvec(x), scores, tol=tol, max_iter=max_iter
    )


def blocked_knn(
    features: torch.Tensor, k: int, block_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of every row of ``features`` with all rows.

    Args:
        features: (N, D) float (unit rows for cosine similarity).
        k: neighbours per row (clipped to N; a row is its own neighbour).
        block_size: rows per block, which bounds the memory to ``block_size x N`` similarities.

    Returns:
        similarities (N, k) float and indices (N, k) long, best first.
    """
    k = min(k, features.shape[0])
    similarities, indices = [], []
    for start in range(0, features.shape[0], block_size):
        block = features[start : start + block_size] @ features.T
        values, index = block.topk(k, dim=1)
        similarities.append(values)
        indices.append(index)
    return torch.cat(similarities), torch.cat(indices)


class SparseGraph:
    """A normalised affinity matrix ``Wn`` held as a sparse (COO) matrix.

    Attributes:
        normalized: (N, N) sparse ``D^-1/2 W D^-1/2``.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, n: int):
        """Build from the edge list of a symmetric ``W`` (duplicate edges are summed, self
        loops dropped)."""
        keep = rows != cols
        rows, cols, weights = rows[keep], cols[keep], weights[keep]
        matrix = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), weights, (n, n), check_invariants=False
        ).coalesce()
        rows, cols = matrix.indices()
        weights = matrix.values()
        degree = torch.zeros(n, device=weights.device, dtype=weights.dtype)
        degree.index_add_(0, rows, weights)
        inverse_sqrt = torch.where(degree > 0, degree.clamp_min(1e-30).rsqrt(), 0.0)
        normalized = inverse_sqrt[rows] * weights * inverse_sqrt[cols]
        self.normalized = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), normalized, (n, n), is_coalesced=True, check_invariants=False
        )

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """(M, N) -> (M, N): ``Wn`` applied to every row (one row per class)."""
        return (self.normalized @ x.T).T

    def to_dense(self) -> torch.Tensor:
        """(N, N) dense ``Wn`` (for tests and small graphs)."""
        return self.normalized.to_dense()


def knn_patch_graph(
    features: torch.Tensor,
    positions: torch.Tensor,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    block_size: int = 4096,
) -> SparseGraph:
    """LPOSS's patch graph: kNN by inner product, geometry-damped, symmetric, normalised.

    Edge ``i -> j`` for the ``k`` nearest ``j`` of ``i`` weighs
    ``max(f_i . f_j, 0)^gamma * exp(-sigma * ||p_i - p_j||)``; then ``W + W^T``, self loops
    removed, ``D^-1/2 W D^-1/2``.

    Args:
        features: (N, D) float unit feature vectors (all patches of all windows).
        positions: (N, 2) float pixel coordinates of the patch centres in the image.
        k, gamma, sigma: the published LPOSS settings are 400, 3 and 0.01.
    """
    similarities, neighbours = blocked_knn(features, k, block_size)
    n, kept = neighbours.shape
    rows = torch.arange(n, device=features.device).repeat_interleave(kept)
    cols = neighbours.flatten()
    distance = torch.linalg.vector_norm(positions[rows] - positions[cols], dim=1)
    weights = similarities.flatten().clamp_min(0).pow(gamma) * torch.exp(-sigma * distance)
    return SparseGraph(torch.cat([rows, cols]), torch.cat([cols, rows]), weights.repeat(2), n)


def neighbour_offsets(size: int) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of a ``size x size`` neighbourhood without the centre, row-major."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"the neighbourhood size must be odd and at least 3, got {size}")
    radius = size // 2
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if (dy, dx) != (0, 0)
    ]


def _shifted(padded: torch.Tensor, offset: Sequence[int], radius: int, size: Sequence[int]):
    """The view of ``padded`` (..., H + 2r, W + 2r) whose pixel (y, x) is (y + dy, x + dx)."""
    dy, dx = offset
    height, width = size
    return padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]


class PixelGraph:
    """LPOSS+'s pixel graph: each pixel linked to its ``size x size`` neighbours.

    The weight of the edge between pixels i and j is ``exp(-||c_i - c_j|| / tau)`` for colour
    vectors c (Lab scaled to about [0, 1] in LPOSS+); edges that leave the image are absent.

    Attributes:
        offsets: the (dy, dx) of every neighbour, see :func:`neighbour_offsets`.
        weights: (O, H, W) float, ``weights[o, y, x]`` is the edge from (y, x) to
            (y + dy_o, x + dx_o), 0 where that pixel lies outside the image.
        inverse_sqrt_degree: (H, W) float ``D^-1/2``.
    """

    def __init__(self, colours: torch.Tensor, size: int = 13, tau: float = 0.01):
        """``colours``: (C, H, W) float per-pixel colour vectors."""
        if colours.ndim != 3:
            raise ValueError(f"colours must be (C, H, W), got {tuple(colours.shape)}")
        self.offsets = neighbour_offsets(size)
        self.radius = size // 2
        self.size = tuple(colours.shape[-2:])
        padded = self._pad(colours)
        inside = self._pad(torch.ones_like(colours[:1]))[0]
        weights = []
        for offset in self.offsets:
            neighbour = _shifted(padded, offset, self.radius, self.size)
            distance = torch.linalg.vector_norm(colours - neighbour, dim=0)
            valid = _shifted(inside, offset, self.radius, self.size)
            weights.append(torch.exp(-distance / tau) * valid)
        self.weights = torch.stack(weights)
        degree = self.weights.sum(0)
        self.inverse_sqrt_degree = torch.where(degree > 0, degree.clamp_min(1e-30).rsqrt(), 0.0)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        return torch.nn.functional.pad(x, (r, r, r, r))

    def adjacency_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """(M, H, W) -> (M, H, W): ``W x`` (unnormalised)."""
        padded = self._pad(x)
        out = torch.zeros_like(x)
        for index, offset in enumerate(self.offsets):
            out += self.weights[index] * _shifted(padded, offset, self.radius, self.size)
        return out

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """(M, H, W) -> (M, H, W): ``Wn x = D^-1/2 W D^-1/2 x``."""
        scale = self.inverse_sqrt_degree
        return scale * self.adjacency_matvec(scale * x)

    def to_dense(self) -> torch.Tensor:
        """(HW, HW) dense ``W`` in row-major pixel order (for tests and small images)."""
        height, width = self.size
        identity = torch.eye(height * width, device=self.weights.device).view(-1, height, width)
        return self.adjacency_matvec(identity).flatten(1).T
