"""Distillation of the sliding-window teacher into the single-pass student."""

from .augment import AugmentationPlan, AugmentationRecipe, apply_plan, draw_plan, plan_generator
from .buckets import bucket_batches, epoch_order
from .cache import TeacherFeatureCache, entry_key, teacher_identity, weights_digest
from .data import DistillationViews, ImageSplit, split_images
from .heldout import HeldoutSet, agreement, build_heldout_sets
from .run import (
    DistillationSetup,
    fill_cache,
    fill_heldout_cache,
    heldout_sets,
    prepare,
    run_distillation,
)
from .targets import fill_teacher_cache, teacher_map
from .trainer import Distiller, OptimSettings, TrainerSettings

__all__ = [
    "AugmentationPlan",
    "AugmentationRecipe",
    "DistillationSetup",
    "DistillationViews",
    "Distiller",
    "HeldoutSet",
    "ImageSplit",
    "OptimSettings",
    "TeacherFeatureCache",
    "TrainerSettings",
    "agreement",
    "apply_plan",
    "bucket_batches",
    "build_heldout_sets",
    "draw_plan",
    "entry_key",
    "epoch_order",
    "heldout_sets",
    "fill_cache",
    "fill_heldout_cache",
    "fill_teacher_cache",
    "plan_generator",
    "prepare",
    "run_distillation",
    "split_images",
    "teacher_identity",
    "teacher_map",
    "weights_digest",
]
