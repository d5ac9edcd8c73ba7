"""Reading images and turning them into model inputs; the bundled sample images; the evaluation
benchmarks in their mmseg layouts."""

from .benchmarks import (
    BENCHMARKS,
    BenchmarkSpec,
    DatasetLayoutError,
    LabelError,
    SegmentationBenchmark,
    benchmark_spec,
)
from .images import (
    IMAGE_SUFFIXES,
    list_images,
    load_image,
    prepare_image,
    prepare_images,
    resize_to_fit,
    to_model_input,
)
from .samples import SAMPLE_IMAGES

__all__ = [
    "BENCHMARKS",
    "IMAGE_SUFFIXES",
    "SAMPLE_IMAGES",
    "BenchmarkSpec",
    "DatasetLayoutError",
    "LabelError",
    "SegmentationBenchmark",
    "benchmark_spec",
    "list_images",
    "load_image",
    "prepare_image",
    "prepare_images",
    "resize_to_fit",
    "to_model_input",
]
