"""The one table of old spellings (``spar.deprecations``): every entry fails, through the shim that
reads it, with its new spelling and the release from which the old one is unknown.

The expected messages are written out here in full: a shim that names the wrong thing, drops the
release, or an entry without a line below fails."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from spar.config import reject_renamed_overrides, renamed_arguments
from spar.deprecations import DEPRECATIONS, KINDS

ROOT = Path(__file__).resolve().parents[1]
UNTIL = " (the old spelling is unknown from 0.3)"
#: (old key, an override using it, the message's renamed part) of spar-train and spar-cache.
TRAINING = [
    (
        "teacher.mode",
        "teacher.mode=online",
        "teacher.mode is now teacher.cache (teacher.mode=cached: teacher.cache=true, "
        "teacher.mode=online: teacher.cache=false)",
    ),
    (
        "train.unfreeze",
        "train.unfreeze=all",
        "train.unfreeze is now backbone.trainable_blocks (e.g. backbone.trainable_blocks=all)",
    ),
    (
        "data",
        "data.root=/data/sa1b",
        "data is now train_images (data=sa1b: train_images=sa1b, data.root=...: "
        "train_images.root=...)",
    ),
]
MODE = "mode is now features (mode=single: features=student, mode=slide: features=teacher)"
SLIDE = "slide is now teacher (e.g. teacher.stride=48; configs/teacher/sliding_window.yaml)"

#: (entry point, its command, old key, an override using it, the message's renamed part).
SETTINGS = [
    *(("train", "spar-train", *renamed) for renamed in TRAINING),
    *(("cache_teacher", "spar-cache", *renamed) for renamed in TRAINING),
    ("eval", "spar-eval", "mode", "mode=slide", MODE),
    ("eval", "spar-eval", "slide", "slide.stride=48", SLIDE),
    ("extract_features", "spar-extract", "mode", "mode=single", MODE),
    ("extract_features", "spar-extract", "slide", "+slide.window=224", SLIDE),
    (
        "speed",
        "spar-speed",
        "strides",
        "strides=[24,48]",
        "strides is now stride_sweep (the teacher strides timed)",
    ),
    (
        "speed",
        "spar-speed",
        "window_batch",
        "window_batch=8",
        "window_batch is now teacher.batch_size",
    ),
    ("segment", "spar-segment", "slide", "slide.stride=24", SLIDE),
    (
        "segment",
        "spar-segment",
        "teacher=true",
        "teacher=true",
        "teacher=true is now show_teacher=true (teacher.* now holds the teacher's settings)",
    ),
    (
        "segment",
        "spar-segment",
        "teacher=false",
        "teacher=false",
        "teacher=false is now show_teacher=false",
    ),
]

_TARGETS = "targets=TeacherTargets(teacher, root, cache=...)"
#: (function, old keyword) -> the whole TypeError message.
ARGUMENTS = {
    ("spar.viz.feature_picture", "teacher"): "feature_picture: renamed arguments: teacher= is now "
    "dense",
    ("spar.segmentation.OpenVocabSegmenter.__init__", "features"): "OpenVocabSegmenter.__init__: "
    "renamed arguments: features= is now dense",
    ("spar.tools.speed.measure_speed", "strides"): "measure_speed: renamed arguments: strides= is "
    "now stride_sweep",
    ("spar.tools.speed.measure_speed", "window_batch"): "measure_speed: renamed arguments: "
    "window_batch= is now teacher={'batch_size': ...}",
    ("spar.tools.speed.measure_speed", "compile_student"): "measure_speed: renamed arguments: "
    "compile_student= is now compile",
    ("spar.tools.demo.compare_teacher_student", "stride"): "compare_teacher_student: renamed "
    "arguments: stride= is now teacher=build_teacher(backbone, {'stride': ...})",
    ("spar.tools.demo.compare_teacher_student", "window"): "compare_teacher_student: renamed "
    "arguments: window= is now teacher=build_teacher(backbone, {'window': ...})",
    ("spar.tools.demo.compare_teacher_student", "teacher_batch_size"): "compare_teacher_student: "
    "renamed arguments: teacher_batch_size= is now teacher=build_teacher(backbone, "
    "{'batch_size': ...})",
    ("spar.distill.run_log.RunLog.__init__", "tensorboard"): "RunLog.__init__: renamed arguments: "
    "tensorboard= is now the hook spar.distill.hooks.TensorBoardHook(out_dir) "
    "(Distiller(..., settings=TrainerSettings(tensorboard=True)) registers it)",
    ("spar.distill.data.DistillationViews.__init__", "cache"): "DistillationViews.__init__: "
    f"renamed arguments: cache= is now {_TARGETS}",
    ("spar.distill.data.DistillationViews.__init__", "teacher_identity"): "DistillationViews"
    ".__init__: renamed arguments: teacher_identity= is now targets=TeacherTargets(...) (it holds "
    "the teacher identity)",
    ("spar.distill.data.DistillationViews.__init__", "load_targets"): "DistillationViews.__init__"
    ": renamed arguments: load_targets= is now read_targets",
    ("spar.distill.trainer.Distiller.__init__", "teacher"): "Distiller.__init__: renamed "
    f"arguments: teacher= is now {_TARGETS}",
    ("spar.distill.trainer.Distiller.__init__", "cache"): "Distiller.__init__: renamed arguments: "
    f"cache= is now {_TARGETS}",
}

#: Old module -> the whole ImportError message.
MODULES = {
    "spar.demo": "spar.demo moved to spar.tools.demo (compare_teacher_student; SAMPLE_IMAGES is "
    "spar.data.SAMPLE_IMAGES)",
    "spar.fault_trials": "spar.fault_trials moved to spar.tools.fault_trials",
}

#: (module or class, old name in the table, the name asked for) -> the whole error message.
ATTRIBUTES = {
    ("spar.distill", "fill_teacher_cache", "fill_teacher_cache"): "spar.distill.fill_teacher_cache "
    "is now TeacherTargets(teacher, root, cache=...).fill(views, context)",
    ("spar.distill.buckets", "image_size", "image_size"): "spar.distill.buckets.image_size is now "
    "image_size_or_none",
    ("spar.config", "is_int", "is_int"): "spar.config.is_int is now is_int_not_bool",
    ("spar.segmentation.OpenVocabSegmenter", "logits", "logits"): "spar.segmentation."
    "OpenVocabSegmenter.logits is now class_probabilities (it returns per-class probabilities; "
    "name_logits gives the scaled cosines)",
    ("spar.speed", "time_call", "time_call"): "spar.speed.time_call is now spar.timing.time_call",
    ("spar.speed", "synchronize", "synchronize"): "spar.speed.synchronize is now "
    "spar.timing.synchronize",
    ("spar.speed", "*", "measure_speed"): "spar.speed.measure_speed moved to "
    "spar.tools.speed.measure_speed (spar.speed is the spar-speed command)",
    ("spar.app", "*", "build_page"): "spar.app.build_page moved to spar.tools.app.build_page "
    "(spar.app is the spar-app command)",
}


def resolve(dotted: str):
    """``"spar.distill.trainer.Distiller.__init__"`` -> the class ``Distiller`` (a constructor is
    called through its class); any other dotted path -> the object it names."""
    parts = dotted.removesuffix(".__init__").split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return target
    raise LookupError(dotted)


def test_every_entry_of_the_table_has_its_expected_message_here():
    listed = {("setting", entry, old) for entry, _, old, _, _ in SETTINGS}
    listed |= {("argument", where, old) for where, old in ARGUMENTS}
    listed |= {("module", "", old) for old in MODULES}
    listed |= {("attribute", where, old) for where, old, _ in ATTRIBUTES}
    table = {(entry.kind, entry.where, entry.old) for entry in DEPRECATIONS}
    assert table == listed
    assert len(table) == len(DEPRECATIONS) == 39  # no entry twice
    assert {entry.kind for entry in DEPRECATIONS} == set(KINDS)
    assert {entry.removed_in for entry in DEPRECATIONS} == {"0.3"}


@pytest.mark.parametrize(("entry", "command", "old", "override", "renamed"), SETTINGS)
def test_renamed_settings_fail_naming_the_command_and_the_new_spelling(
    entry, command, old, override, renamed
):
    with pytest.raises(SystemExit) as stop:
        reject_renamed_overrides([override], entry)
    assert str(stop.value) == f"error: {command}: renamed settings: {renamed}{UNTIL}"
    assert "scripts/" not in str(stop.value)


@pytest.mark.parametrize(("where", "old"), sorted(ARGUMENTS))
def test_renamed_arguments_fail_with_their_new_spelling(where, old):
    function = resolve(where)
    with pytest.raises(TypeError) as error:
        function(**{old: None})
    assert str(error.value) == ARGUMENTS[where, old] + UNTIL


@pytest.mark.parametrize("module", sorted(MODULES))
def test_moved_modules_fail_on_import_with_their_new_home(module):
    with pytest.raises(ImportError) as error:
        importlib.import_module(module)
    assert str(error.value) == MODULES[module] + UNTIL
    assert module not in sys.modules


@pytest.mark.parametrize(("where", "old", "name"), sorted(ATTRIBUTES))
def test_renamed_or_moved_names_fail_with_their_new_spelling(where, old, name):
    holder = resolve(where)
    if isinstance(holder, type):  # a method that was renamed: calling it fails
        with pytest.raises(AttributeError) as error:
            getattr(holder, name)(None)
    else:  # a module: `from module import name` fails
        with pytest.raises(ImportError) as error:
            exec(f"from {where} import {name}", {})
    assert str(error.value) == ATTRIBUTES[where, old, name] + UNTIL


def test_unknown_names_of_the_shim_modules_stay_attribute_errors():
    import spar.config
    import spar.distill
    import spar.distill.buckets

    for module in (spar.config, spar.distill, spar.distill.buckets):
        assert not hasattr(module, "no_such_name")
    import spar.app

    assert not hasattr(spar.app, "__wrapped__")  # dunders are Python's own look-ups


def test_renamed_arguments_refuses_a_function_without_entries():
    def plain(value=None):
        """A function no entry of the table names."""

    with pytest.raises(
        LookupError, match=r"no argument of \S+\.<locals>\.plain in the deprecations"
    ):
        renamed_arguments()(plain)


@pytest.mark.slow  # a Hydra start-up
def test_a_tool_run_as_main_finds_its_entries():
    """``python -m spar.tools.demo`` runs the module as ``__main__``: the decorator still finds
    ``spar.tools.demo.compare_teacher_student`` in the table."""
    result = subprocess.run(
        [sys.executable, "-m", "spar.tools.demo", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
