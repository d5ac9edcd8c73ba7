"""Settings of a distillation run: the single source of the optimizer and loop defaults, and the
check of a whole training config that runs before any long work.

:class:`OptimSettings` and :class:`TrainerSettings` are also the structured configs of
``optim`` and ``trainer`` in ``configs/train.yaml`` (registered by :mod:`spar.configs` as
``schema/optim`` and ``schema/trainer``): the YAML writes only values that differ from these
defaults. Types are loose where several forms are accepted (``betas``, ``grad_clip``), so that
the checks here give the errors. :func:`training_settings` checks every value a run
reads (``trainer``, ``optim``, ``teacher``, ``train_images``, ``heldout``, ``resume``,
``resume_allow``, ``max_image_pixels``, ``device``, ``compile``) and names the key and the value
of the first bad one, so a typo fails in seconds instead of after the teacher-cache fill; it
returns them as one typed, frozen :class:`DistillationSettings`, built once where a run enters
the library (``spar.distill.run.prepare``) and passed down in parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..config import SettingError, is_int_not_bool, require, require_bool, require_int
from ..models.teacher_config import TeacherSettings
from ..utils import PRECISIONS
from .augment import AugmentationRecipe

SCHEDULES = ("constant", "cosine")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class OptimSettings:
    """AdamW and its learning-rate schedule (the paper: lr 2e-5, weight decay 1e-4)."""

    lr: float = 2e-5
    weight_decay: float = 1e-4
    betas: Any = (0.9, 0.999)  # two numbers in [0, 1); a list from a config
    schedule: str = "constant"  # constant | cosine (to zero)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        require(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {SCHEDULES}")
        require(_is_number(self.lr) and self.lr > 0, "optim.lr", self.lr, "a number > 0")
        require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        betas = list(self.betas) if isinstance(self.betas, list | tuple) else None
        require(
            betas is not None
            and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas),
            "optim.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        require_int("optim.warmup_steps", self.warmup_steps, 0)
        self.betas = tuple(self.betas)


@dataclass
class TrainerSettings:
    """Loop settings.

    Attributes:
        epochs: passes over the training views.
        accumulate: micro-steps (views) per optimizer step.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        precision: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``
            (with loss scaling); autocast covers student and teacher.
        batch_size: views per micro-batch; above 1, views are grouped into same-size batches
            (size buckets, see ``spar.distill.buckets``).
        log_every: optimizer steps between JSONL log records.
        checkpoint_every: optimizer steps between mid-epoch checkpoints (0: epoch ends only).
        stop_after_steps: stop (checkpointed, resumable) after this many optimizer steps,
            e.g. to fit a job's time limit; the schedule still spans all epochs.
        num_workers: data-loading worker processes.
        seed: seeds the epoch permutations and the global RNGs.
        show_progress: draw a tqdm bar on rank 0.
        tensorboard: also write the logged scalars as TensorBoard events in ``out_dir/tb``
            (needs the ``tensorboard`` package).
    """

    epochs: int = 10
    accumulate: int = 1
    grad_clip: Any = None  # a number > 0, or None
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    batch_size: int = 1
    num_workers: int = 4
    seed: int = 0
    show_progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        require(
            self.precision in PRECISIONS,
            "trainer.precision",
            self.precision,
            f"one of {PRECISIONS}",
        )
        for name in ("epochs", "accumulate", "log_every", "batch_size"):
            require_int(f"trainer.{name}", getattr(self, name), 1)
        require_int("trainer.checkpoint_every", self.checkpoint_every, 0)
        require_int("trainer.stop_after_steps", self.stop_after_steps, 1, optional=True)
        require_int("trainer.num_workers", self.num_workers, 0)
        require_int("trainer.seed", self.seed, 0)
        require(
            self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
            "trainer.grad_clip",
            self.grad_clip,
            "a number > 0 or null",
        )
        require_bool("trainer.show_progress", self.show_progress)
        require_bool("trainer.tensorboard", self.tensorboard)


def settings_from(kind: type, values: dict[str, Any], section: str) -> Any:
    """``kind(**values)``, with an unknown key named as ``<section>.<key>``."""
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingError(
            f"unknown setting(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return kind(**values)


@dataclass(frozen=True)
class BackboneSettings:
    """The ``backbone`` node: the registered ``name`` and the other keyword arguments of
    :func:`spar.models.create_backbone` (``pretrained``, ``trainable_blocks``, ...), as given."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def create_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``create_backbone`` (``name`` included)."""
        return {"name": self.name, **self.options}


@dataclass(frozen=True)
class TeacherRunSettings:
    """The ``teacher`` node of a training run: the teacher itself (``settings``, what
    :func:`spar.models.build_teacher` reads) and its training cache (``cache``: stored teacher
    maps, ``False``: an online teacher; ``cache_dir``: where, ``None`` without a cache)."""

    settings: TeacherSettings
    cache: bool = True
    cache_dir: Path | None = None


@dataclass(frozen=True)
class TrainImagesSettings:
    """The ``train_images`` node: the image folder (``root``; ``None``: the bundled samples),
    the first ``max_images`` of it (``None``: all), ``draws_per_image`` views of each, drawn by
    ``augment`` with ``augment_seed``."""

    root: Path | None
    augment: AugmentationRecipe
    max_images: int | None = None
    draws_per_image: int = 1
    augment_seed: int = 0

    @property
    def folder(self) -> Path:
        """``root``, or the bundled sample images when it is ``None``."""
        if self.root is None:
            from ..data.samples import SAMPLE_IMAGES

            return SAMPLE_IMAGES
        return self.root


@dataclass(frozen=True)
class HeldoutSettings:
    """The ``heldout`` node: ``num_images`` held-out images (the last of the training folder, or
    the first of ``root``), compared with the teacher at each (long, short) size of ``sizes``."""

    num_images: int
    sizes: tuple[tuple[int, int], ...]
    root: Path | None = None


@dataclass(frozen=True)
class DistillationSettings:
    """Every setting of a training run, checked once (:func:`training_settings`) and passed down
    in typed parts; the resolved config dict stays the run's record (checkpoints, fingerprint).

    ``max_image_pixels`` is ``None`` for Pillow's own limit; ``resume_allow`` is empty without
    ``resume``."""

    backbone: BackboneSettings
    teacher: TeacherRunSettings
    train_images: TrainImagesSettings
    heldout: HeldoutSettings
    optim: OptimSettings
    trainer: TrainerSettings
    device: str = "auto"
    compile: bool | str = False
    resume: Path | None = None
    resume_allow: tuple[str, ...] = ()
    max_image_pixels: int | None = None


def _path(value: Any, expand: bool = True) -> Path | None:
    if value is None:
        return None
    return Path(value).expanduser() if expand else Path(value)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # a [h, w] pair from a config


def _checked_parts(config: dict[str, Any]) -> dict[str, Any]:
    """The checks of :func:`check_training_config`, in order; the typed parts but
    ``resume_allow``."""
    from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
    from ..models.compiling import check_compile_setting
    from ..models.teacher_config import TEACHER_SETTINGS, check_teacher_settings
    from .checkpointing import check_resumable  # checkpointing imports torch models

    optim = settings_from(OptimSettings, dict(config["optim"]), "optim")
    trainer = settings_from(TrainerSettings, dict(config["trainer"]), "trainer")
    if trainer.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError("trainer.tensorboard=true needs: pip install tensorboard") from error
    teacher = config["teacher"]
    require_bool("teacher.cache", teacher.get("cache", True))
    if teacher.get("cache", True):
        cache_dir = teacher.get("cache_dir")
        require(
            isinstance(cache_dir, str | Path) and str(cache_dir) != "",
            "teacher.cache_dir",
            cache_dir,
            "a folder",
        )
    backbone = config["backbone"]
    check_teacher_settings(teacher, backbone["name"])
    data = config["train_images"]
    require_int("train_images.max_images", data.get("max_images"), 1, optional=True)
    require_int("train_images.draws_per_image", data.get("draws_per_image", 1), 1)
    require_int("train_images.augment_seed", data.get("augment_seed", 0), 0)
    heldout = config["heldout"]
    _check_heldout(heldout)
    require_int("max_image_pixels", config.get("max_image_pixels"), 1, optional=True)
    check_compile_setting(config.get("compile", False))
    if config.get("resume") is not None:
        check_resumable(config["resume"])
    cached = teacher.get("cache", True)
    return {
        "backbone": BackboneSettings(
            backbone["name"], MappingProxyType({k: v for k, v in backbone.items() if k != "name"})
        ),
        "teacher": TeacherRunSettings(
            TeacherSettings(**{k: _frozen(teacher[k]) for k in TEACHER_SETTINGS if k in teacher}),
            cache=cached,
            cache_dir=Path(teacher["cache_dir"]) if cached else None,
        ),
        "train_images": TrainImagesSettings(
            root=_path(data.get("root")),
            augment=AugmentationRecipe.from_dict(data["augment"]),
            max_images=data.get("max_images"),
            draws_per_image=data.get("draws_per_image", 1),
            augment_seed=data.get("augment_seed", 0),
        ),
        "heldout": HeldoutSettings(
            num_images=heldout["num_images"],
            sizes=tuple((size[0], size[1]) for size in heldout["sizes"]),
            root=_path(heldout.get("root") or None),  # "" too: the training folder's last
        ),
        "optim": optim,
        "trainer": trainer,
        "device": config.get("device", "auto"),
        "compile": config.get("compile", False),
        "resume": _path(config.get("resume"), expand=False),
        "max_image_pixels": config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
    }


def training_settings(config: dict[str, Any]) -> DistillationSettings:
    """Check every value of a resolved ``train.yaml`` config (a plain dict) that the run reads,
    before any long work (:func:`check_training_config`, then ``resume_allow``), and return
    them as one typed, frozen :class:`DistillationSettings`.

    Raises:
        SettingError, FileNotFoundError, WeightLoadingError, ImportError: as
            :func:`check_training_config`; ``SettingError`` for a bad ``resume_allow`` too.
        ValueError: an unknown ``train_images.augment`` key.
    """
    from .fingerprint import check_resume_allow  # fingerprint imports torch models

    parts = _checked_parts(config)
    return DistillationSettings(**parts, resume_allow=tuple(check_resume_allow(config)))


def check_training_config(config: dict[str, Any]) -> tuple[OptimSettings, TrainerSettings]:
    """Check every value of a resolved ``train.yaml`` config that the run reads, before any
    long work; returns the optimizer and loop settings (:func:`training_settings` returns all
    of them, ``resume_allow`` checked too).

    Raises:
        SettingError: naming the key and the value (e.g. ``trainer.batch_size must be an
            integer >= 1, got 0``).
        FileNotFoundError: ``resume`` or ``heldout.root`` names something that is not there.
        WeightLoadingError: the ``resume`` training state cannot be read (the file is named).
        ImportError: ``trainer.tensorboard=true`` without the ``tensorboard`` package.
    """
    parts = _checked_parts(config)
    return parts["optim"], parts["trainer"]


def _check_heldout(heldout: dict[str, Any]) -> None:
    require_int("heldout.num_images", heldout.get("num_images"), 0)
    root = heldout.get("root")
    if root and not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"heldout.root: held-out image folder {root} not found")
    sizes = heldout.get("sizes")
    pair_ok = isinstance(sizes, list | tuple) and all(
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(is_int_not_bool(s) and s > 0 for s in size)
        for size in sizes
    )
    require(pair_ok, "heldout.sizes", sizes, "a list of [long, short] pairs of positive integers")
    if heldout["num_images"] > 0:
        require(len(sizes) > 0, "heldout.sizes", sizes, "non-empty when heldout.num_images > 0")
