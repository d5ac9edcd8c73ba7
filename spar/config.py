"""Configuration vocabulary: settings that were renamed fail with their new spelling.

:data:`RENAMED_SETTINGS` holds, per entry point, a table ``old key -> new spelling``.
Scripts check their command-line overrides against it before Hydra composes the config (Hydra
would only say that the old key is unknown), and the library functions that take a config
check its keys too, so a notebook's hand-written dict gets the same message.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

F = TypeVar("F", bound=Callable[..., Any])

_MODE_TO_FEATURES = "features (mode=single: features=student, mode=slide: features=teacher)"
_SLIDE_TO_TEACHER = "teacher (e.g. teacher.stride=48; configs/teacher/sliding_window.yaml)"
_TRAINING = {
    "teacher.mode": "teacher.cache (teacher.mode=cached: teacher.cache=true, "
    "teacher.mode=online: teacher.cache=false)",
    "train.unfreeze": "backbone.trainable_blocks (e.g. backbone.trainable_blocks=all)",
    "data": "train_images (data=sa1b: train_images=sa1b, data.root=...: train_images.root=...)",
}
#: Per entry point (configs/<name>.yaml): renamed setting or override -> its new spelling.
RENAMED_SETTINGS: dict[str, dict[str, str]] = {
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


class RenamedSettingError(ValueError):
    """A setting was given under a name it no longer has; the message gives the new one."""


class SettingError(ValueError):
    """A setting has a value it cannot take; the message names the key and the value."""


def is_int(value: Any) -> bool:
    """``value`` is an integer setting (``True``/``False`` are not, though Python says so)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, key: str, value: Any, what: str) -> None:
    """Raise :class:`SettingError` ``"<key> must be <what>, got <value>"`` unless ``ok``."""
    if not ok:
        raise SettingError(f"{key} must be {what}, got {value!r}")


def require_int(key: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """The setting ``key`` is an integer >= ``minimum`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    what = f"an integer >= {minimum}" + (" or null" if optional else "")
    require(is_int(value) and value >= minimum, key, value, what)


def require_bool(key: str, value: Any) -> None:
    """The setting ``key`` is ``true`` or ``false``."""
    require(isinstance(value, bool), key, value, "true or false")


def _override_key(override: str) -> str:
    """``"+teacher.stride=48"`` -> ``"teacher.stride"`` (Hydra's ``+``, ``++``, ``~`` stripped)."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def _has_key(config: Mapping[str, Any], dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_renamed(
    settings: Mapping[str, Any] | Sequence[str], renamed: Mapping[str, str], where: str
) -> None:
    """Raise :class:`RenamedSettingError` if ``settings`` uses a key of ``renamed``.

    Args:
        settings: a (nested) config mapping, or Hydra command-line overrides such as
            ``["mode=slide", "slide.stride=48"]``.
        renamed: dotted old key (or a whole old override, ``"teacher=true"``) -> how to write
            it now; one of :data:`RENAMED_SETTINGS`.
        where: the script or function, named in the message.
    """
    if isinstance(settings, Mapping):
        used = [old for old in renamed if _has_key(settings, old)]
    else:
        given = [o.lstrip("+~").strip() for o in settings if not o.startswith("-")]
        keys = [_override_key(override) for override in given]
        used = [
            old
            for old in renamed
            if old in given or any(k == old or k.startswith(old + ".") for k in keys)
        ]
    if used:
        lines = "; ".join(f"{old} is now {renamed[old]}" for old in used)
        raise RenamedSettingError(f"{where}: renamed settings: {lines}")


def reject_renamed_overrides(overrides: Sequence[str], script: str) -> None:
    """For ``scripts/<script>.py``: exit with the message of :func:`check_renamed` (no
    traceback) when its command-line ``overrides`` use a renamed setting."""
    try:
        check_renamed(overrides, RENAMED_SETTINGS.get(script, {}), f"scripts/{script}.py")
    except RenamedSettingError as error:
        raise SystemExit(f"error: {error}") from None


def _user_error_types() -> tuple[type[Exception], ...]:
    # Imported here: spar.data and spar.models import this module.
    from .data.benchmarks import LabelError
    from .distill.run_log import RunFolderError
    from .imaging import ImageTooLargeError, ImageValueError
    from .models.weights import WeightLoadingError
    from .provenance import ProvenanceError

    return (
        FileNotFoundError,
        RenamedSettingError,
        SettingError,
        WeightLoadingError,
        LabelError,
        RunFolderError,
        ProvenanceError,
        ImageValueError,
        ImageTooLargeError,
    )


def report_user_errors(main: F) -> F:
    """Decorate a script's ``main`` (under ``@hydra.main``): a user error (a missing file or
    folder, e.g. a dataset root; a weight file that does not fit; a renamed setting; a bad label
    file) ends the script with ``error: <message>`` on stderr and exit status 1 instead of a
    traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback, as for Hydra's own errors."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except _user_error_types() as error:
            _remove_unused_run_folder()
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise SystemExit(f"error: {error}") from None

    return wrapper  # type: ignore[return-value]


def _remove_unused_run_folder() -> None:
    """After a user error, remove the Hydra run folder when it holds nothing but Hydra's own
    ``.hydra/`` (the run stopped before writing anything), so that no empty run is left
    behind. A folder with anything else in it (a resumed run, a user's folder) is kept."""
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main (a notebook call): nothing to clean
        return
    entries = {entry.name for entry in run_dir.iterdir()} if run_dir.is_dir() else set()
    if entries <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def used_config_groups() -> str:
    """For ``--help`` (``configs/hydra/help/spar.yaml``): one ``group: option, option`` line per
    config group the running script's config uses; Hydra's own list names every folder of
    configs/, e.g. ``dataset`` under ``scripts/train.py``, which does not use it."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    loader = GlobalHydra.instance().config_loader()
    groups = sorted(g for g in HydraConfig.get().runtime.choices if g.split("/")[0] != "hydra")
    return "\n".join(f"{g}: {', '.join(sorted(loader.get_group_options(g)))}" for g in groups)


# Registered on import: Hydra resolves the help template before a script's main() runs, and
# every script imports spar.config through the library.
if not OmegaConf.has_resolver("spar_config_groups"):
    OmegaConf.register_new_resolver("spar_config_groups", used_config_groups)


def renamed_arguments(**renamed: str) -> Callable[[F], F]:
    """Decorate a function whose keyword arguments were renamed: ``old="new spelling"``.

    Passing an old keyword raises ``TypeError`` naming the new one, instead of Python's bare
    "unexpected keyword argument".
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            used = [old for old in renamed if old in kwargs]
            if used:
                lines = "; ".join(f"{old}= is now {renamed[old]}" for old in used)
                raise TypeError(f"{function.__qualname__}: renamed arguments: {lines}")
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
