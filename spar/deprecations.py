"""The one table of old spellings: settings, keyword arguments, modules and attributes that were
renamed or moved, each with its new spelling and the release from which the old spelling is no
longer recognised (it is then just unknown, without a hint).

Every shim reads :data:`DEPRECATIONS`: the scripts and the config-taking functions
(:func:`spar.config.check_renamed`), the ``@renamed_arguments()`` decorator
(:func:`spar.config.renamed_arguments`), the module-level ``__getattr__`` of a module whose names
moved (:func:`module_getattr`), and the modules that moved (:func:`moved_module_error`). An old
spelling fails with its new one: a new entry here is all it takes.

This module imports nothing of spar: every layer may read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

#: The release whose code no longer recognises the old spellings of this table.
REMOVED_IN = "0.3"

#: What an entry renames: a setting of an entry point, a keyword argument of a function, a whole
#: module, or a name in a module or class.
KINDS = ("setting", "argument", "module", "attribute")


@dataclass(frozen=True)
class Deprecation:
    """One old spelling and its new one.

    Attributes:
        kind: one of :data:`KINDS`.
        where: ``setting``: the entry point's config name (``"train"``, ``spar/configs/train.yaml``;
            its console command is in :data:`COMMANDS`); ``argument``: the function,
            ``"module.Qualified.name"``; ``attribute``: the module or class holding the name;
            ``module``: ``""``.
        old: the old spelling: a dotted setting (or a whole override such as ``teacher=true``),
            a keyword, a dotted module, or a name (``"*"``: every name of a moved module).
        new: how to write it now (``"*"`` in it stands for the name asked for).
        removed_in: the release from which the old spelling is no longer recognised.
    """

    kind: str
    where: str
    old: str
    new: str
    removed_in: str = REMOVED_IN

    def message(self, name: str | None = None) -> str:
        """``"<old> is now <new> (...)"``: what each shim says (``name`` fills a ``"*"``)."""
        new = self.new.replace("*", name) if name is not None else self.new
        if self.kind == "setting":
            old = self.old
        elif self.kind == "argument":
            old = f"{self.old}="
        elif self.kind == "module":
            old = self.old
        else:
            old = f"{self.where}.{name if self.old == '*' and name else self.old}"
        verb = "moved to" if self.kind == "module" or self.old == "*" else "is now"
        return f"{old} {verb} {new} (the old spelling is unknown from {self.removed_in})"


#: Console command of each entry point (config name) that takes Hydra overrides.
COMMANDS = {
    "train": "spar-train",
    "cache_teacher": "spar-cache",
    "eval": "spar-eval",
    "extract_features": "spar-extract",
    "segment": "spar-segment",
    "speed": "spar-speed",
}

_MODE_TO_FEATURES = "features (mode=single: features=student, mode=slide: features=teacher)"
_SLIDE_TO_TEACHER = "teacher (e.g. teacher.stride=48; configs/teacher/sliding_window.yaml)"
_TRAINING = {
    "teacher.mode": "teacher.cache (teacher.mode=cached: teacher.cache=true, "
    "teacher.mode=online: teacher.cache=false)",
    "train.unfreeze": "backbone.trainable_blocks (e.g. backbone.trainable_blocks=all)",
    "data": "train_images (data=sa1b: train_images=sa1b, data.root=...: train_images.root=...)",
}
_SETTINGS = {
    "train": _TRAINING,
    "cache_teacher": _TRAINING,
    "eval": {"mode": _MODE_TO_FEATURES, "slide": _SLIDE_TO_TEACHER},
    "extract_features": {"mode": _MODE_TO_FEATURES, "slide": _SLIDE_TO_TEACHER},
    "speed": {
        "strides": "stride_sweep (the teacher strides timed)",
        "window_batch": "teacher.batch_size",
    },
    "segment": {
        "slide": _SLIDE_TO_TEACHER,
        "teacher=true": "show_teacher=true (teacher.* now holds the teacher's settings)",
        "teacher=false": "show_teacher=false",
    },
}
_TARGETS = "targets=TeacherTargets(teacher, root, cache=...)"
_ARGUMENTS = {
    "spar.viz.feature_picture": {"teacher": "dense"},
    "spar.segmentation.OpenVocabSegmenter.__init__": {"features": "dense"},
    "spar.tools.speed.measure_speed": {
        "strides": "stride_sweep",
        "window_batch": "teacher={'batch_size': ...}",
        "compile_student": "compile",
    },
    "spar.tools.demo.compare_teacher_student": {
        "stride": "teacher=build_teacher(backbone, {'stride': ...})",
        "window": "teacher=build_teacher(backbone, {'window': ...})",
        "teacher_batch_size": "teacher=build_teacher(backbone, {'batch_size': ...})",
    },
    "spar.distill.run_log.RunLog.__init__": {
        "tensorboard": "the hook spar.distill.hooks.TensorBoardHook(out_dir) "
        "(Distiller(..., settings=TrainerSettings(tensorboard=True)) registers it)",
    },
    "spar.distill.data.DistillationViews.__init__": {
        "cache": _TARGETS,
        "teacher_identity": "targets=TeacherTargets(...) (it holds the teacher identity)",
        "load_targets": "read_targets",
    },
    "spar.distill.trainer.Distiller.__init__": {"teacher": _TARGETS, "cache": _TARGETS},
}
_MODULES = {
    "spar.demo": "spar.tools.demo (compare_teacher_student; SAMPLE_IMAGES is "
    "spar.data.SAMPLE_IMAGES)",
    "spar.fault_trials": "spar.tools.fault_trials",
}
_ATTRIBUTES = {
    "spar.distill": {
        "fill_teacher_cache": "TeacherTargets(teacher, root, cache=...).fill(views, context)",
    },
    "spar.distill.buckets": {"image_size": "image_size_or_none"},
    "spar.config": {"is_int": "is_int_not_bool"},
    "spar.segmentation.OpenVocabSegmenter": {
        "logits": "class_probabilities (it returns per-class probabilities; name_logits gives "
        "the scaled cosines)",
    },
    # The commands spar.speed and spar.app held the library before 0.2.
    "spar.speed": {
        "time_call": "spar.timing.time_call",
        "synchronize": "spar.timing.synchronize",
        "*": "spar.tools.speed.* (spar.speed is the spar-speed command)",
    },
    "spar.app": {"*": "spar.tools.app.* (spar.app is the spar-app command)"},
}

#: Every old spelling, in one list.
DEPRECATIONS: tuple[Deprecation, ...] = (
    *(
        Deprecation("setting", where, old, new)
        for where, table in _SETTINGS.items()
        for old, new in table.items()
    ),
    *(
        Deprecation("argument", where, old, new)
        for where, table in _ARGUMENTS.items()
        for old, new in table.items()
    ),
    *(Deprecation("module", "", old, new) for old, new in _MODULES.items()),
    *(
        Deprecation("attribute", where, old, new)
        for where, table in _ATTRIBUTES.items()
        for old, new in table.items()
    ),
)


def deprecations(kind: str, where: str) -> dict[str, Deprecation]:
    """The entries of ``kind`` at ``where`` (see :class:`Deprecation`), by old spelling."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {d.old: d for d in DEPRECATIONS if d.kind == kind and d.where == where}


def attribute_deprecation(where: str, name: str) -> Deprecation | None:
    """The entry for the old ``name`` of the module or class ``where`` (or its ``"*"``)."""
    if name.startswith("__"):  # dunders are Python's own look-ups (pickle, inspect, ...)
        return None
    entries = deprecations("attribute", where)
    return entries.get(name, entries.get("*"))


def module_getattr(module: str) -> Callable[[str], NoReturn]:
    """A module-level ``__getattr__`` for ``module``: an old name raises ``ImportError`` (so
    that ``from module import old`` keeps the message) naming the new one; any other unknown
    name is Python's ``AttributeError``."""

    def __getattr__(name: str) -> NoReturn:
        entry = attribute_deprecation(module, name)
        if entry is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        raise ImportError(entry.message(name))

    return __getattr__


def moved_module_error(module: str) -> ImportError:
    """The ``ImportError`` that the module ``module``, which moved, raises when imported."""
    return ImportError(deprecations("module", "")[module].message())
