"""The evaluation protocol: how dense features become a segmentation, written down once.

:data:`PROTOCOL` (an :class:`EvalProtocol`) holds the paper's defaults: the (long, short) bound
images are resized to fit, the prompt-template set, the logit scale and bias, and the two
background thresholds. Everything that needs one of them reads it from here: the segmenter
(:class:`spar.segmentation.OpenVocabSegmenter`), the pictures (:mod:`spar.viz`), the page
(:mod:`spar.tools.app`), the evaluation and feature extraction, and the Hydra configs, through
the structured configs that :mod:`spar.configs` registers (:class:`BenchmarkSettings` types a
``configs/dataset`` node; a benchmark file sets only what differs, e.g. VOC21's logit scale).

This module imports nothing of spar, so any layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING


@dataclass(frozen=True)
class EvalProtocol:
    """The segmentation protocol (the SPAR authors' evaluation settings).

    Attributes:
        bounds: (long, short): an image is resized, keeping its aspect ratio, to fit it
            (mmcv's ``Resize(keep_ratio=True)`` rule, :func:`spar.imaging.resize_to_fit`).
        templates: the prompt-template set (:data:`spar.text_classifier.TEMPLATE_SETS`):
            ``imagenet80``, CLIP's 80 ImageNet templates.
        logit_scale: multiplies the cosine of a pixel's feature and a class-name embedding.
        logit_bias: added to the scaled cosine.
        prob_threshold: pixels whose best class probability is below it become class 0
            (``None``: no threshold).
        area_threshold: classes covering at most this fraction of an image's foreground give
            their pixels to the next best class (``None``: no threshold).
    """

    bounds: tuple[int, int] = (2048, 672)
    templates: str = "imagenet80"
    logit_scale: float = 40.0
    logit_bias: float = 0.0
    prob_threshold: float | None = None
    area_threshold: float | None = None


#: The protocol's defaults, the one place they are written.
PROTOCOL = EvalProtocol()


def protocol_defaults(*names: str) -> dict[str, Any]:
    """``{name: default}`` of the named :class:`EvalProtocol` fields (all when none is named),
    tuples as lists (as a YAML config holds them)."""
    chosen = names or tuple(f.name for f in fields(EvalProtocol))
    values = {name: getattr(PROTOCOL, name) for name in chosen}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass
class BenchmarkSettings:
    """A ``configs/dataset`` node: a benchmark and the protocol it is scored under.

    The protocol fields default to :data:`PROTOCOL`'s values. Types are loose where spar
    accepts several forms (``bounds``: a pair, or ``null`` to keep the size);
    :func:`spar.evaluation.check_eval_settings` gives the one-line errors.

    Attributes:
        name: a benchmark of :mod:`spar.data.benchmarks` (``voc21``, ``ade20k``, ...).
        root: where its files are, in the mmseg layout.
        split: the split read.
        class_names: a class-name file (one class per line, synonyms by commas); ``None``: the
            packaged ``spar/assets/classes/<name>.txt``.
        thresholds_by_backbone: ``{backbone name: {prob_threshold, area_threshold}}``, read by
            a benchmark whose thresholds depend on the backbone (VOC21).
    """

    name: str = MISSING
    root: str = MISSING
    split: str = "val"
    class_names: str | None = None
    bounds: Any = field(default_factory=lambda: list(PROTOCOL.bounds))
    logit_scale: float = PROTOCOL.logit_scale
    logit_bias: float = PROTOCOL.logit_bias
    prob_threshold: float | None = PROTOCOL.prob_threshold
    area_threshold: float | None = PROTOCOL.area_threshold
    thresholds_by_backbone: dict[str, Any] | None = None
