"""Training-free open-vocabulary segmentation: dense features against class-name embeddings.

:class:`OpenVocabSegmenter` classifies every pixel; the class lists are
:mod:`spar.class_names`', the text embeddings :mod:`spar.text_classifier`'s. Their public
names are importable from here too.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .class_names import (  # noqa: F401 - all but ClassEntry and parse_classes: re-exported
    ClassEntry,
    ClassNameError,
    display_names,
    load_class_names,
    parse_classes,
)
from .config import renamed_arguments
from .deprecations import attribute_deprecation
from .imaging import to_model_input
from .models.base import check_images
from .protocol import PROTOCOL
from .text_classifier import (  # noqa: F401 - PROMPT_TEMPLATES, TEMPLATE_SETS, ...: re-exported
    PROMPT_TEMPLATES,
    TEMPLATE_SETS,
    Template,
    TextEncoder,
    build_text_classifier,
    resolve_templates,
)
from .utils import module_device

DenseFeatures = Callable[[torch.Tensor], torch.Tensor]


def _check_fraction(value: float | None, name: str) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be None or in [0, 1], got {value}")


def _resolve_size(images: torch.Tensor, output_size: Sequence[int] | None) -> tuple[int, int]:
    """Validate ``images`` ((B, 3, H, W) float) and return ``output_size`` or (H, W)."""
    check_images(images)
    if output_size is None:
        return images.shape[-2], images.shape[-1]
    try:
        size = tuple(operator.index(side) for side in output_size)
    except TypeError:
        size = ()
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"output_size must be two positive ints, got {output_size!r}")
    return size


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch off an enclosing autocast on ``device``, so that the ops inside run in float32."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


class OpenVocabSegmenter(nn.Module):
    """Per-pixel classification of dense features by cosine similarity to class-name embeddings.

    The text embeddings are computed once, at construction, and kept as (non-persistent)
    buffers on the device ``encode_text`` returns, so ``.to(device)`` moves them (and
    ``dense`` too when it is a Module). :meth:`from_backbone` puts everything on the
    backbone's device.

    Background rules in :meth:`predict`, in the SPAR authors' order: first ``area_threshold``
    (per image, small foreground classes lose their pixels to the next best class), then
    ``prob_threshold`` (pixels whose best probability is below it become class 0).

    The defaults of ``logit_scale``, ``logit_bias``, the thresholds and ``templates`` are the
    evaluation protocol's, :data:`spar.protocol.PROTOCOL`.

    Args:
        dense: the dense-feature source, ``(B, 3, H, W) float -> (B, C, h, w)`` (a backbone, or
            a sliding-window teacher).
        encode_text: ``list[str] -> (n, C)`` text encoder in the same embedding space.
        classes: class entries; each a name, ``"name, synonym"`` or a list of synonyms.
            Class 0 is the one the background rules fall back to.
        logit_scale: multiplies the cosine similarity before the softmax.
        logit_bias: added to the scaled cosine.
        prob_threshold: pixels whose best class probability is below it become class 0.
        area_threshold: per image, foreground classes (not class 0) that win at most this
            fraction of the foreground pixels drop out: their pixels take the next best class.
        templates: prompt templates for the text ensemble: a set name (``"imagenet80"``, the
            paper's; ``"single"``) or callables ``name -> prompt``.
        refiner: optional label propagation (:class:`spar.refine.LPOSS`, LPOSS or LPOSS+):
            the per-name cosines are propagated before the logit scale. ``None``: none.
        upsampler: optional learned feature upsampling (:class:`spar.refine.AnyUpUpsampler`):
            features are upsampled to the image guided by it, instead of bilinear logits; with
            a ``refiner`` it brings each window's propagated scores to the window's pixels.
            Both stages need ``dense`` to carry ``mean``/``std`` (its input normalisation).
    """

    @renamed_arguments()
    def __init__(
        self,
        dense: DenseFeatures,
        encode_text: TextEncoder,
        classes: Sequence[ClassEntry],
        logit_scale: float = PROTOCOL.logit_scale,
        logit_bias: float = PROTOCOL.logit_bias,
        prob_threshold: float | None = PROTOCOL.prob_threshold,
        area_threshold: float | None = PROTOCOL.area_threshold,
        templates: str | Sequence[Template] = PROTOCOL.templates,
        refiner: nn.Module | None = None,
        upsampler: nn.Module | None = None,
    ) -> None:
        super().__init__()
        _check_fraction(prob_threshold, "prob_threshold")
        _check_fraction(area_threshold, "area_threshold")
        if (refiner is not None or upsampler is not None) and not all(
            hasattr(dense, name) for name in ("mean", "std")
        ):
            raise ValueError("refine/upsample stages need a dense source with mean and std")
        self.dense = dense
        self.refiner = refiner
        self.upsampler = upsampler
        self.class_names = parse_classes(classes)
        embeddings, name_to_class = build_text_classifier(encode_text, classes, templates)
        self.register_buffer("text_embeddings", embeddings, persistent=False)
        self.register_buffer("name_to_class", name_to_class, persistent=False)
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.prob_threshold = prob_threshold
        self.area_threshold = area_threshold

    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        classes: Sequence[ClassEntry],
        dense: DenseFeatures | None = None,
        **kwargs: Any,
    ) -> OpenVocabSegmenter:
        """Segment with ``dense`` (default: the backbone's own forward) and the backbone's text.

        The segmenter is placed on the backbone's device. ``kwargs`` go to the constructor
        (``logit_scale``, thresholds, ``templates``).
        """
        source = dense if dense is not None else backbone
        segmenter = cls(source, backbone.encode_text, classes, **kwargs)
        return segmenter.to(module_device(backbone, default=segmenter.text_embeddings.device))

    @property
    def num_classes(self) -> int:
        """K, the number of classes (not names)."""
        return len(self.class_names)

    def name_logits(
        self, images: torch.Tensor, output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Scaled cosine per name, before any softmax.

        Args:
            images: (B, 3, H, W) float, normalised as the backbone expects.
            output_size: (H_out, W_out); default (H, W).

        Returns:
            (B, N_names, H_out, W_out) float32 ``logit_scale * cos + logit_bias``, bilinearly
            resized (``align_corners=False``) from the feature grid straight to the output
            size, as the SPAR authors' segmentor does (naomikombol/SPAR
            ``segmentors/segmentor_vit.py``, ``forward_feature``), after the backbone's
            ``patch_fit`` rule; for a dense source without one (the sliding-window teacher),
            the padding is cropped away first.
            With stages, ``cos`` is per pixel of the image through the upsampler and/or the
            propagated cosine of the refiner, resized bilinearly to (H_out, W_out).
        """
        size = _resolve_size(images, output_size)
        if self.refiner is not None or self.upsampler is not None:
            return self._staged_logits(images, size)
        fit = getattr(self.dense, "patch_fit", None)
        features = self._unit_features(self._fit_to_patches(images, fit))
        with _without_autocast(features.device):  # bf16 cosines would flip near ties
            cosine = torch.einsum("bchw,nc->bnhw", features, self.text_embeddings.float())
            logits = self.logit_scale * cosine + self.logit_bias
            if fit is None:  # a source without the authors' rule (a teacher): crop its padding
                logits = self._crop_padding(logits, images.shape[-2:])
            if tuple(logits.shape[-2:]) == tuple(size):
                return logits
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def _fit_to_patches(self, images: torch.Tensor, fit: str | None) -> torch.Tensor:
        """(B, 3, H, W) -> the image the single pass sees: cut to whole patches for a
        ``patch_fit == "truncate"`` backbone (at least one patch kept), else unchanged (a
        ``"pad"`` or ``"stretch"`` backbone fits the image itself)."""
        patch = getattr(self.dense, "patch_size", None)
        if fit != "truncate" or patch is None:
            return images
        height, width = images.shape[-2:]
        keep_h = height // patch * patch if height >= patch else height
        keep_w = width // patch * patch if width >= patch else width
        return images[..., :keep_h, :keep_w]

    def _staged_logits(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """:meth:`name_logits` through the refine/upsample stages: (B, N_names, *size)."""
        mean = torch.tensor(self.dense.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.dense.std, device=images.device).view(1, 3, 1, 1)
        pixels = images.float() * std + mean  # back to [0, 1], what the stages take
        patch = getattr(self.dense, "patch_size", None)
        if self.refiner is not None:
            to_pixels = None
            if self.upsampler is not None:

                def to_pixels(window_pixels, features, scores):
                    return self.upsampler(window_pixels, features, scores, patch)

            cosine = self.refiner(
                pixels,
                features=lambda windows: self._dense_features(
                    to_model_input(windows, self.dense.mean, self.dense.std).to(images.dtype)
                ),
                classify=self._cosine,
                to_pixels=to_pixels,
                patch_size=patch or 16,
            )
        else:
            cosine = self.upsampler(
                pixels, self._dense_features(images), patch_size=patch, project=self._row_cosine
            )
        with _without_autocast(cosine.device):
            logits = self.logit_scale * cosine.float() + self.logit_bias
            if tuple(logits.shape[-2:]) == tuple(size):
                return logits
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def _cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, N_names, h, w) float32 cosines with the names."""
        with _without_autocast(features.device):
            unit = F.normalize(features.float(), dim=1)
            return torch.einsum("bchw,nc->bnhw", unit, self.text_embeddings.float())

    def _row_cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n, C) feature rows -> (B, n, N_names) float32 cosines with the names."""
        with _without_autocast(features.device):
            return F.normalize(features.float(), dim=-1) @ self.text_embeddings.float().T

    def _crop_padding(self, logits: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Drop the part of the grid that covers the backbone's bottom/right padding.

        Backbones pad images to a multiple of the patch size p, so the last row/column of
        cells may reach past the image. The logits are then upsampled to the padded size and
        cropped to the image, so that every output pixel maps to the right place.
        """
        patch = getattr(self.dense, "patch_size", None)
        height, width = image_size
        rows, cols = logits.shape[-2:]
        if patch is None or (rows * patch, cols * patch) == (height, width):
            return logits
        padded = F.interpolate(
            logits, size=(rows * patch, cols * patch), mode="bilinear", align_corners=False
        )
        return padded[..., :height, :width]

    def class_probabilities(
        self, images: torch.Tensor, output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Per-class probabilities.

        A float32 softmax over *all names* of :meth:`name_logits`, then, per class, the max of
        its synonyms' probabilities. Values lie in [0, 1]; with synonyms a pixel's class scores
        can sum to less than 1.

        Args:
            images: (B, 3, H, W) float.
            output_size: (H_out, W_out); default (H, W).

        Returns:
            (B, K, H_out, W_out) float32.
        """
        name_logits = self.name_logits(images, output_size)
        with _without_autocast(name_logits.device):
            probabilities = name_logits.softmax(dim=1)
        batch, _, height, width = probabilities.shape
        index = self.name_to_class.view(1, -1, 1, 1).expand_as(probabilities)
        scores = probabilities.new_zeros(batch, self.num_classes, height, width)
        return scores.scatter_reduce(1, index, probabilities, reduce="amax", include_self=False)

    def logits(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Renamed :meth:`class_probabilities` (it returns probabilities, not logits)."""
        entry = attribute_deprecation(f"{__name__}.OpenVocabSegmenter", "logits")
        raise AttributeError(entry.message())

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Class index per pixel: argmax of :meth:`class_probabilities` after the background
        rules: first ``area_threshold`` (:meth:`_suppress_small_classes`), then pixels whose best
        probability is below ``prob_threshold`` become 0.

        Args:
            images: (B, 3, H, W) float.
            output_size: (H_out, W_out); default (H, W).

        Returns:
            (B, H_out, W_out) long, values in [0, K).
        """
        scores = self.class_probabilities(images, output_size)
        if self.area_threshold is not None:
            scores = self._suppress_small_classes(scores)
        confidence, mask = scores.max(dim=1)
        if self.prob_threshold is not None:
            mask[confidence < self.prob_threshold] = 0
        return mask

    def _unit_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) float32 features, unit norm along C."""
        return F.normalize(self._dense_features(images), dim=1)

    def _dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) float32 features of ``dense``, checked against C."""
        features = self.dense(images)
        channels = self.text_embeddings.shape[1]
        if features.ndim != 4 or features.shape[:2] != (images.shape[0], channels):
            raise ValueError(
                f"dense must return (B={images.shape[0]}, C={channels}, h, w) to match the "
                f"text embeddings, got shape {tuple(features.shape)}"
            )
        return features.float()

    def _suppress_small_classes(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) class probabilities -> same, with the probabilities of each image's
        small foreground classes set to 0.

        The SPAR authors' rule (naomikombol/SPAR ``segmentors/segmentor_vit.py``,
        ``postprocess_result``): take the argmax; a class other than 0 is small when it wins at
        most ``area_threshold`` times the pixels won by all classes other than 0; its
        probabilities are zeroed, so that its pixels go to their next best class (and through
        ``prob_threshold`` afterwards).
        """
        batch, classes = scores.shape[:2]
        winners = scores.argmax(dim=1).flatten(1)  # (B, H*W)
        counts = torch.zeros(batch, classes, device=scores.device, dtype=torch.float32)
        counts.scatter_add_(1, winners, torch.ones_like(winners, dtype=torch.float32))
        foreground = counts[:, 1:]
        keep = foreground > self.area_threshold * foreground.sum(dim=1, keepdim=True)
        scores = scores.clone()
        scores[:, 1:] *= keep.to(scores.dtype).view(batch, classes - 1, 1, 1)
        return scores
