"""Distillation of the sliding-window teacher into the single-pass student."""

from ..deprecations import module_getattr as _module_getattr
from .augment import AugmentationPlan, AugmentationRecipe, apply_plan, draw_plan, plan_generator
from .buckets import SizeBucketBatchSampler, bucket_batches, epoch_order
from .cache import TeacherFeatureCache, entry_key, teacher_identity, weights_digest
from .checkpointing import resolve_resume_paths, resume_training, save_training_checkpoint
from .data import DistillationViews, ImageSplit, split_images
from .heldout import HeldoutSet, agreement, build_heldout_sets
from .hooks import CheckpointHook, HeldoutHook, MetricsLogHook, StopAfterSteps, TensorBoardHook
from .loop import HookBase, TrainLoop
from .optimization import StudentOptimizer, learning_rate_factor
from .run import (
    DistillationSetup,
    fill_cache,
    fill_heldout_cache,
    heldout_sets,
    prepare,
    run_distillation,
)
from .run_log import RunLog
from .settings import DistillationSettings, OptimSettings, TrainerSettings, training_settings
from .targets import TargetKey, TeacherTargets, teacher_map
from .trainer import Distiller

__all__ = [
    "AugmentationPlan",
    "AugmentationRecipe",
    "CheckpointHook",
    "DistillationSettings",
    "DistillationSetup",
    "DistillationViews",
    "Distiller",
    "HeldoutHook",
    "HeldoutSet",
    "HookBase",
    "ImageSplit",
    "MetricsLogHook",
    "OptimSettings",
    "RunLog",
    "SizeBucketBatchSampler",
    "StopAfterSteps",
    "StudentOptimizer",
    "TargetKey",
    "TeacherFeatureCache",
    "TeacherTargets",
    "TensorBoardHook",
    "TrainLoop",
    "TrainerSettings",
    "agreement",
    "apply_plan",
    "bucket_batches",
    "build_heldout_sets",
    "draw_plan",
    "entry_key",
    "epoch_order",
    "fill_cache",
    "fill_heldout_cache",
    "heldout_sets",
    "learning_rate_factor",
    "plan_generator",
    "prepare",
    "resolve_resume_paths",
    "resume_training",
    "run_distillation",
    "save_training_checkpoint",
    "split_images",
    "teacher_identity",
    "teacher_map",
    "training_settings",
    "weights_digest",
]

#: ``from spar.distill import fill_teacher_cache`` (renamed): an ImportError naming the new
#: spelling (:data:`spar.deprecations.DEPRECATIONS`).
__getattr__ = _module_getattr(__name__)
