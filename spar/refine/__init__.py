"""Refinement stages of the segmentation: LPOSS / LPOSS+ label propagation and AnyUp feature
upsampling, in plain torch (see ``docs/architecture.md``)."""

from .anyup import AnyUp
from .build import (
    REFINE_NAMES,
    UPSAMPLE_NAMES,
    build_affinity_backbone,
    build_refiner,
    build_stages,
    build_upsampler,
    check_stage_settings,
    load_anyup,
)
from .graph import PixelGraph, SparseGraph, conjugate_gradient, knn_patch_graph, propagate
from .lposs import LPOSS, AffinityBackbone
from .upsample import AnyUpUpsampler

__all__ = [
    "LPOSS",
    "REFINE_NAMES",
    "UPSAMPLE_NAMES",
    "AffinityBackbone",
    "AnyUp",
    "AnyUpUpsampler",
    "PixelGraph",
    "SparseGraph",
    "build_affinity_backbone",
    "build_refiner",
    "build_stages",
    "build_upsampler",
    "check_stage_settings",
    "conjugate_gradient",
    "knn_patch_graph",
    "load_anyup",
    "propagate",
]
