"""The teacher's configuration: the ``configs/teacher`` node (:class:`TeacherSettings`, the one
place its defaults are written), its checks before any model is built
(:func:`check_teacher_settings`), and the one place a teacher or a dense-feature source is built
from configuration (:func:`build_teacher`, :func:`dense_features`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from omegaconf import ListConfig
from torch import nn

from ..utils import autocast_dtype, module_device
from .compiling import check_compile_setting

if TYPE_CHECKING:
    from .teacher import SlidingWindowTeacher


@dataclass
class TeacherSettings:
    """The ``configs/teacher`` node (the structured config :mod:`spar.configs` registers as
    ``schema/teacher``) and the one place the teacher's defaults are written.

    Types are loose where several forms are accepted (``stride: 24`` or ``[24, 32]``, ``compile:
    false`` or a mode name): :func:`check_teacher_settings` gives the one-line errors.

    Attributes:
        window: window side or (h, w) in pixels; ``None``: the backbone's native size.
        stride: pixels between windows, an int or (sy, sx); at most the window.
        batch_size: the cap on windows per forward (fewer on CUDA when free memory is short).
        compile: ``torch.compile`` the window forward: ``False``, ``True``,
            ``"reduce-overhead"`` or ``"max-autotune"``.
    """

    window: Any = None
    stride: Any = 24
    batch_size: int = 32
    compile: Any = False


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    # Any sequence (a Hydra ListConfig from `teacher.stride=[24,32]` too), but not a string.
    if isinstance(value, Sequence | ListConfig) and not isinstance(value, str | bytes):
        pair = tuple(value)
    else:
        pair = (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


#: The keys of a ``configs/teacher`` node that :func:`build_teacher` reads.
TEACHER_SETTINGS = tuple(field.name for field in fields(TeacherSettings))


def check_teacher_settings(
    settings: Mapping[str, Any] | None, backbone: str, key: str = "teacher"
) -> None:
    """Check a ``configs/teacher`` node for backbone ``backbone`` (a registered name) before any
    model is built: ``stride`` and ``window`` are positive ints or pairs, the stride is at most
    the window (``window: null`` is the backbone's native size), ``batch_size`` a positive int
    and ``compile`` a compile setting.

    Raises:
        SettingError: one line naming the key and the value, e.g. ``teacher.stride [500, 500]
            is larger than teacher.window [224, 224] (the maskclip backbone's native size)``.
    """
    from ..config import SettingError, require_int
    from .registry import backbone_entry

    settings = settings or {}
    try:
        stride = _pair(settings.get("stride", TeacherSettings.stride), f"{key}.stride")
        window_value = settings.get("window", TeacherSettings.window)
        if window_value is None:
            native = backbone_entry(backbone).config.native_size
            window, where = (native, native), f" (the {backbone} backbone's native size)"
        else:
            window, where = _pair(window_value, f"{key}.window"), ""
    except ValueError as error:
        raise SettingError(str(error)) from None
    if stride[0] > window[0] or stride[1] > window[1]:
        raise SettingError(
            f"{key}.stride {list(stride)} is larger than {key}.window {list(window)}{where}: "
            "pixels between windows would be left uncovered; use a stride of at most the window"
        )
    require_int(f"{key}.batch_size", settings.get("batch_size", TeacherSettings.batch_size), 1)
    check_compile_setting(settings.get("compile", TeacherSettings.compile), f"{key}.compile")


def build_teacher(
    backbone: nn.Module,
    settings: Mapping[str, Any] | TeacherSettings | None = None,
    precision: str = "fp32",
    copy_backbone: bool = True,
) -> SlidingWindowTeacher:
    """The sliding-window teacher that a ``configs/teacher`` node describes.

    The one place that turns configuration into a teacher (training, evaluation, the
    single-image tools, the demo and the speed benchmark all call it).

    Args:
        backbone: the frozen backbone the teacher runs, on the device it will run on.
        settings: ``window`` (``None``: the backbone's native size), ``stride``, ``batch_size``
            (the cap on windows per forward) and ``compile``; other keys (e.g. the training
            cache's) are not the teacher's and are ignored. Missing keys take
            :class:`TeacherSettings`'s defaults. A :class:`TeacherSettings` is read as well.
        precision: ``fp32`` (the backbone as it is), ``bf16``, ``fp16`` or ``auto`` (bf16 on a
            CUDA device that supports it), resolved on the backbone's device by
            :func:`spar.utils.autocast_dtype`; a low precision gives the teacher a copy of the
            backbone in that dtype.
        copy_backbone: ``False`` converts ``backbone`` in place instead (see
            :class:`SlidingWindowTeacher`).
    """
    from .teacher import SlidingWindowTeacher  # here: the teacher module imports this one

    settings = settings or {}
    if isinstance(settings, TeacherSettings):
        settings = {k: getattr(settings, k) for k in TEACHER_SETTINGS}
    return SlidingWindowTeacher(
        backbone,
        **{k: settings[k] for k in TEACHER_SETTINGS if k in settings},
        dtype=autocast_dtype(precision, module_device(backbone)),
        copy_backbone=copy_backbone,
    )


FEATURE_SOURCES = ("student", "teacher")


def check_feature_source(features: str) -> None:
    """Raise ``ValueError`` unless ``features`` is one of :data:`FEATURE_SOURCES` (callers check
    before loading a model, so a typo fails at once)."""
    if features not in FEATURE_SOURCES:
        raise ValueError(f"features must be one of {FEATURE_SOURCES}, got {features!r}")


def dense_features(
    backbone: nn.Module,
    features: str,
    teacher_settings: Mapping[str, Any] | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """The dense-feature source a ``features`` setting names: ``"student"``, the backbone's
    single pass; ``"teacher"``, :func:`build_teacher` of it (``teacher_settings``,
    ``precision``)."""
    check_feature_source(features)
    if features == "student":
        return backbone
    return build_teacher(backbone, teacher_settings, precision)
