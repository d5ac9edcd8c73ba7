"""Reading images and turning them into model inputs."""

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
    "IMAGE_SUFFIXES",
    "SAMPLE_IMAGES",
    "list_images",
    "load_image",
    "prepare_image",
    "prepare_images",
    "resize_to_fit",
    "to_model_input",
]
