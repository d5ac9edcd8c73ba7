"""spar: single-pass, any-resolution dense features distilled from a sliding-window teacher."""

from .metrics import MeanIoU
from .models import SlidingWindowTeacher, create_backbone, list_backbones
from .segmentation import OpenVocabSegmenter

__version__ = "0.1.0"

__all__ = [
    "MeanIoU",
    "OpenVocabSegmenter",
    "SlidingWindowTeacher",
    "create_backbone",
    "list_backbones",
]
