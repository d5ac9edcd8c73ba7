"""Dense backbones behind one registry, and the sliding-window teacher."""

from . import clip, dinov3txt, maskclip, siglip2  # noqa: F401 - importing registers the families
from .base import DenseBackbone, check_images, pad_to_patch_multiple, resolve_trainable_blocks
from .compiling import compile_backbone, compile_report
from .pretrained import from_pretrained, save_pretrained
from .registry import (
    BackboneConfig,
    backbone_entry,
    create_backbone,
    list_backbones,
    register_backbone,
)
from .teacher import SlidingWindowTeacher
from .teacher_config import build_teacher, dense_features
from .weights import WeightLoadingError
from .windows import WindowLayout

__all__ = [
    "BackboneConfig",
    "DenseBackbone",
    "SlidingWindowTeacher",
    "WeightLoadingError",
    "WindowLayout",
    "backbone_entry",
    "build_teacher",
    "dense_features",
    "from_pretrained",
    "check_images",
    "compile_backbone",
    "compile_report",
    "create_backbone",
    "list_backbones",
    "pad_to_patch_multiple",
    "register_backbone",
    "resolve_trainable_blocks",
    "save_pretrained",
]
