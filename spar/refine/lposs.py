"""LPOSS and LPOSS+: training-free label propagation over patches, then over pixels
(Stojnic, Kalantidis, Tolias, CVPR 2025), in plain torch.

LPOSS. The image, resized once to fit (``long_side``, ``short_side``) = (2048, 448) as the published
test pipeline does (mmcv ``Resize``, keep ratio, cv2 bilinear; here
:func:`spar.imaging.resize_to_fit`), is cut into ``window`` windows at ``stride``. For every
window, the label source gives per-patch class scores Y (raw cosines of dense features with the text
embeddings) and the affinity backbone gives per-patch features (DINO ViT-B/16 value features of the
last block, L2-normalised). One kNN graph joins all patches of all windows
(:func:`spar.refine.graph.knn_patch_graph`), and per class ``(I - alpha Wn) Z = Y`` is solved by
conjugate gradient. Every window's Z is brought to the window's pixels (bilinear, or AnyUp) and the
windows are averaged where they overlap.

LPOSS+. A second propagation over pixels: a 13x13 neighbourhood graph weighted by
``exp(-||Lab_i - Lab_j|| / tau)`` with Lab divided by (100, 128, 128), the same alpha and solver,
started from the stage-1 scores (:class:`spar.refine.graph.PixelGraph`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..imaging import resize_to_fit, to_model_input
from ..models.windows import window_offsets
from .anyup import HUB
from .colour import rgb_to_lab
from .graph import PixelGraph, knn_patch_graph, propagate

Features = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, h, w) pixels in [0, 1] -> (B, C, h', w') dense features."""
Classify = Callable[[torch.Tensor], torch.Tensor]
"""(B, C, h', w') features -> (B, M, h', w') class scores (raw cosines)."""
ToPixels = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(pixels (B, 3, h, w), features (B, C, h', w'), scores (B, M, h', w')) -> (B, M, h, w)."""


@dataclass
class AffinitySettings:
    """``refine.affinity``: the affinity backbone of LPOSS.

    Attributes:
        model: a timm ViT name (its last block's value features are the affinities).
        weights: ``hub`` (timm's published weights, Hugging Face hub cache), a local
            .safetensors/.pth file, or ``None`` (random weights: timing only).
        options: extra ``timm.create_model`` arguments, e.g. a tiny ViT's
            ``{embed_dim: 64, depth: 2, num_heads: 2}``; none that names a file.
    """

    model: str = "vit_base_patch16_224.dino"
    weights: Any = HUB
    options: Any = None


@dataclass
class LPOSSSettings:
    """The ``configs/refine/lposs`` node (the structured config :mod:`spar.configs` registers
    as ``schema/lposs``; ``lposs_plus`` extends it) and the one place LPOSS's defaults are
    written: the published ViT-B/16 settings (see :class:`LPOSS`, which takes every field but
    ``name`` and ``affinity`` as a keyword argument).

    Attributes:
        name: ``lposs`` or ``lposs_plus`` (LPOSS+: the pixel stage too).
        affinity: the affinity backbone (:class:`AffinitySettings`).
        window, stride: window side and pixels between windows.
        short_side, long_side: the image is resized once to fit (long_side, short_side);
            ``short_side=None``: the evaluation size.
        k: neighbours per patch in the kNN graph (inner product).
        gamma, sigma: edge weight ``max(sim, 0)^gamma * exp(-sigma * pixel distance)``.
        alpha: ``(I - alpha Wn) Z = Y`` is solved per class.
        tol, max_iter: conjugate-gradient tolerance (relative to ||Y||) and iterations.
        neighbourhood, tau, lab_scale: LPOSS+ only: odd side of each pixel's neighbourhood,
            edge weight ``exp(-||Lab_i - Lab_j|| / tau)``, Lab divided by ``lab_scale``.
        batch_size: windows per forward of the label source and the affinity backbone.
        knn_block: rows per block of the kNN search (bounds its memory).
    """

    name: str = "lposs"
    affinity: AffinitySettings = field(default_factory=AffinitySettings)
    window: int = 224
    stride: int = 112
    short_side: int | None = 448
    long_side: int = 2048
    k: int = 400
    gamma: float = 3.0
    sigma: float = 0.01
    alpha: float = 0.95
    tol: float = 1e-6
    max_iter: int = 10
    neighbourhood: int = 13
    tau: float = 0.01
    lab_scale: Any = (100.0, 128.0, 128.0)
    batch_size: int = 32
    knn_block: int = 4096


#: The :class:`LPOSS` keyword arguments a ``refine`` node may set.
LPOSS_OPTIONS = tuple(f.name for f in fields(LPOSSSettings) if f.name not in ("name", "affinity"))


class AffinityBackbone(nn.Module):
    """Per-patch affinity features: the value vectors of a timm ViT's last attention block.

    Args:
        model: a timm ``VisionTransformer`` (``vit_base_patch16_224.dino`` for LPOSS), built
            with ``dynamic_img_size=True`` so that any window size runs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(config.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(config.get("std", (0.229, 0.224, 0.225)))
        self.patch_size = model.patch_embed.patch_size[0]
        self._captured: list[torch.Tensor] = []
        model.blocks[-1].attn.qkv.register_forward_hook(
            lambda _module, _inputs, output: self._captured.append(output)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (H, W multiples of the patch size) -> (B, D, H/p, W/p) float32
        unit value features."""
        self._captured.clear()
        self.model.forward_features(to_model_input(pixels, self.mean, self.std))
        qkv = self._captured.pop()
        self._captured.clear()
        batch, tokens, _ = qkv.shape
        values = qkv.float().view(batch, tokens, 3, -1)[:, self.model.num_prefix_tokens :, 2]
        rows, cols = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        values = values.transpose(1, 2).reshape(batch, -1, rows, cols)
        return F.normalize(values, dim=1)


def bilinear_to_pixels(
    pixels: torch.Tensor, features: torch.Tensor, scores: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Per-patch scores (B, M, h, w) -> (B, M, H, W): bilinear to the padded size (h p, w p),
    cropped to the (H, W) of ``pixels`` (the patches cover the bottom/right padding)."""
    height, width = pixels.shape[-2:]
    rows, cols = scores.shape[-2:]
    padded = F.interpolate(
        scores, size=(rows * patch_size, cols * patch_size), mode="bilinear", align_corners=False
    )
    return padded[..., :height, :width]


class LPOSS(nn.Module):
    """LPOSS (and, with ``pixel_refine``, LPOSS+) label propagation.

    Defaults are the published settings for ViT-B/16 (LPOSS's configs): windows of 224 at stride 112
    on the image resized to fit (2048, 448) (``img_scale=(2048, 448)``, keep ratio, in
    vladan-stojnic/LPOSS ``segmentation/configs/_base_/datasets/*.py``); k = 400 neighbours,
    ``gamma`` = 3, ``sigma`` = 0.01 (edge ``max(sim, 0)^3 exp(-0.01 d)``, d in pixels between patch
    centres), ``alpha`` = 0.95, CG tolerance 1e-6 (relative to ||Y||) and at most 10 iterations
    (``dfs_search`` in vladan-stojnic/LPOSS ``segmentation/evaluation/lposs_eval.py``, commit
    e489a7445528922ddfe4e39631ef2fe34827c873, for both stages); LPOSS+: 13x13 neighbourhoods,
    ``tau`` = 0.01, Lab scaled by (100, 128, 128).

    The defaults are written once, in :class:`LPOSSSettings`.

    Shapes: :meth:`forward` takes pixels (B, 3, H, W) in [0, 1] and returns (B, M, H', W')
    float32 propagated scores at the working size (H', W'): the size that fits the bounds.

    Args:
        affinity: the affinity backbone (:class:`AffinityBackbone`).
        window, stride: window side and stride in pixels (multiples of the patch size).
        short_side, long_side: the bounds the input is resized to fit, by
            :func:`spar.imaging.resize_to_fit` (mmcv's rule: the short side becomes
            ``short_side`` unless the long side would pass ``long_side``); ``short_side=None``:
            the input size. Give the original image to follow the published pipeline (one
            resize); :func:`spar.evaluation.evaluate_benchmark` does.
        batch_size: windows per forward of the label source and the affinity backbone.
        knn_block: rows per block of the kNN search.
    """

    def __init__(
        self,
        affinity: nn.Module,
        *,
        window: int = LPOSSSettings.window,
        stride: int = LPOSSSettings.stride,
        short_side: int | None = LPOSSSettings.short_side,
        long_side: int = LPOSSSettings.long_side,
        k: int = LPOSSSettings.k,
        gamma: float = LPOSSSettings.gamma,
        sigma: float = LPOSSSettings.sigma,
        alpha: float = LPOSSSettings.alpha,
        tol: float = LPOSSSettings.tol,
        max_iter: int = LPOSSSettings.max_iter,
        pixel_refine: bool = False,
        neighbourhood: int = LPOSSSettings.neighbourhood,
        tau: float = LPOSSSettings.tau,
        lab_scale: Sequence[float] = LPOSSSettings.lab_scale,
        batch_size: int = LPOSSSettings.batch_size,
        knn_block: int = LPOSSSettings.knn_block,
    ) -> None:
        super().__init__()
        if window <= 0 or stride <= 0 or stride > window:
            raise ValueError(f"need 0 < stride <= window, got window {window}, stride {stride}")
        self.affinity = affinity
        self.window, self.stride = window, stride
        self.short_side, self.long_side = short_side, long_side
        self.k, self.gamma, self.sigma = k, gamma, sigma
        self.alpha, self.tol, self.max_iter = alpha, tol, max_iter
        self.pixel_refine, self.neighbourhood, self.tau = pixel_refine, neighbourhood, tau
        self.lab_scale = tuple(lab_scale)
        self.batch_size, self.knn_block = batch_size, knn_block

    @property
    def bounds(self) -> tuple[int, int] | None:
        """(long, short) bound of the working size, ``None`` when the input size is kept."""
        return None if self.short_side is None else (self.long_side, self.short_side)

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, left, bottom, right) of every window over an (height, width) image."""
        window_h, window_w = min(self.window, height), min(self.window, width)
        return [
            (top, left, top + window_h, left + window_w)
            for top in window_offsets(height, window_h, self.stride)
            for left in window_offsets(width, window_w, self.stride)
        ]

    def forward(
        self,
        pixels: torch.Tensor,
        features: Features,
        classify: Classify,
        to_pixels: ToPixels | None = None,
        patch_size: int = 16,
    ) -> torch.Tensor:
        """Propagated scores for every image of ``pixels``.

        Args:
            pixels: (B, 3, H, W) in [0, 1].
            features: the label source's dense features of pixel windows.
            classify: features -> class scores Y (raw cosines, before any softmax).
            to_pixels: brings a window's per-patch Z to its pixels (default: bilinear).
            patch_size: the label source's patch size (its grid covers padded windows).

        Returns:
            (B, M, H', W') float32 at the working size (fitted to :attr:`bounds`).
        """
        pixels = pixels.float()
        if self.bounds is not None:
            pixels = resize_to_fit(pixels, self.bounds)
        if to_pixels is None:

            def to_pixels(window_pixels, _features, scores):
                return bilinear_to_pixels(window_pixels, _features, scores, patch_size)

        return torch.cat(
            [
                self._one_image(image[None], features, classify, to_pixels, patch_size)
                for image in pixels
            ]
        )

    def _one_image(
        self,
        pixels: torch.Tensor,
        features: Features,
        classify: Classify,
        to_pixels: ToPixels,
        patch_size: int,
    ) -> torch.Tensor:
        """(1, 3, H, W) -> (1, M, H, W)."""
        height, width = pixels.shape[-2:]
        boxes = self.windows(height, width)
        crops = torch.cat([pixels[..., t:b, left:r] for t, left, b, r in boxes])
        label_features, scores, affinity = [], [], []
        for start in range(0, len(boxes), self.batch_size):
            batch = crops[start : start + self.batch_size]
            dense = features(batch)
            label_features.append(dense)
            scores.append(classify(dense).float())
            affinity.append(self._affinity(batch, scores[-1].shape[-2:]))
        label_features, scores, affinity = (
            torch.cat(x) for x in (label_features, scores, affinity)
        )
        with _float32(pixels.device):
            propagated = self._propagate_patches(scores, affinity, boxes, patch_size)
            stitched = self._stitch(crops, label_features, propagated, boxes, to_pixels, pixels)
            if self.pixel_refine:
                stitched = self._propagate_pixels(pixels[0], stitched[0])[None]
        return stitched

    def _affinity(self, crops: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(n, 3, h, w) windows -> (n, D, *grid) unit affinity features on the label grid."""
        patch = self.affinity.patch_size
        pad_h, pad_w = -crops.shape[-2] % patch, -crops.shape[-1] % patch
        values = self.affinity(F.pad(crops, (0, pad_w, 0, pad_h)))
        if tuple(values.shape[-2:]) != tuple(grid):
            values = F.normalize(
                F.interpolate(values, size=tuple(grid), mode="bilinear", align_corners=False),
                dim=1,
            )
        return values

    def _propagate_patches(
        self,
        scores: torch.Tensor,
        affinity: torch.Tensor,
        boxes: list[tuple[int, int, int, int]],
        patch_size: int,
    ) -> torch.Tensor:
        """Scores (n, M, h, w) and affinity features (n, D, h, w) of the n windows -> the
        propagated (n, M, h, w). Patch centres lie at ``origin + (index + 0.5) * patch_size``."""
        count, classes, rows, cols = scores.shape
        device = scores.device
        origins = torch.tensor([(t, left) for t, left, _, _ in boxes], device=device).float()
        ys = (torch.arange(rows, device=device) + 0.5) * patch_size
        xs = (torch.arange(cols, device=device) + 0.5) * patch_size
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).view(1, -1, 2)
        positions = (origins[:, None, :] + grid).view(-1, 2)
        nodes = affinity.float().permute(0, 2, 3, 1).reshape(-1, affinity.shape[1])
        graph = knn_patch_graph(nodes, positions, self.k, self.gamma, self.sigma, self.knn_block)
        initial = scores.permute(1, 0, 2, 3).reshape(classes, -1)
        solved = propagate(graph.matvec, initial, self.alpha, self.tol, self.max_iter)
        return solved.view(classes, count, rows, cols).permute(1, 0, 2, 3)

    def _stitch(
        self,
        crops: torch.Tensor,
        label_features: torch.Tensor,
        propagated: torch.Tensor,
        boxes: list[tuple[int, int, int, int]],
        to_pixels: ToPixels,
        pixels: torch.Tensor,
    ) -> torch.Tensor:
        """Every window's Z brought to its pixels, averaged over overlaps -> (1, M, H, W)."""
        height, width = pixels.shape[-2:]
        total = propagated.new_zeros(1, propagated.shape[1], height, width)
        covered = propagated.new_zeros(1, 1, height, width)
        for start in range(0, len(boxes), self.batch_size):
            stop = start + self.batch_size
            window_scores = to_pixels(
                crops[start:stop], label_features[start:stop], propagated[start:stop]
            ).float()
            for (top, left, bottom, right), scores in zip(
                boxes[start:stop], window_scores, strict=True
            ):
                total[..., top:bottom, left:right] += scores
                covered[..., top:bottom, left:right] += 1
        return total / covered

    def _propagate_pixels(self, pixels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """LPOSS+: pixels (3, H, W) in [0, 1], stage-1 scores (M, H, W) -> (M, H, W)."""
        scale = torch.tensor(self.lab_scale, device=pixels.device).view(3, 1, 1)
        graph = PixelGraph(rgb_to_lab(pixels) / scale, self.neighbourhood, self.tau)
        return propagate(graph.matvec, scores, self.alpha, self.tol, self.max_iter)


def _float32(device: torch.device):
    """Autocast off on ``device`` (the solver runs in float32)."""
    return torch.autocast(device.type, enabled=False)
