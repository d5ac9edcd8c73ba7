"""Configuration vocabulary: settings that were renamed fail with their new spelling.

:data:`RENAMED_SETTINGS` holds, per entry point, the renamed settings of the one table of old
spellings (:data:`spar.deprecations.DEPRECATIONS`). The console commands check their
command-line overrides against it before Hydra composes the config (Hydra would only say that
the old key is unknown), and the library functions that take a config check its keys too, so a
notebook's hand-written dict gets the same message.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from .deprecations import COMMANDS, Deprecation, deprecations, module_getattr

F = TypeVar("F", bound=Callable[..., Any])

#: Per entry point (configs/<name>.yaml): renamed setting or override -> its entry of the table.
RENAMED_SETTINGS: dict[str, dict[str, Deprecation]] = {
    entry: deprecations("setting", entry) for entry in COMMANDS
}


class RenamedSettingError(ValueError):
    """A setting was given under a name it no longer has; the message gives the new one."""


class SettingError(ValueError):
    """A setting has a value it cannot take; the message names the key and the value."""


def is_int_not_bool(value: Any) -> bool:
    """``value`` is an ``int`` and not a ``bool`` (``True``/``False`` are no integer setting,
    though Python says they are ints)."""
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
    require(is_int_not_bool(value) and value >= minimum, key, value, what)


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
    settings: Mapping[str, Any] | Sequence[str],
    renamed: Mapping[str, Deprecation | str],
    where: str,
) -> None:
    """Raise :class:`RenamedSettingError` if ``settings`` uses a key of ``renamed``.

    Args:
        settings: a (nested) config mapping, or Hydra command-line overrides such as
            ``["mode=slide", "slide.stride=48"]``.
        renamed: dotted old key (or a whole old override, ``"teacher=true"``) -> its
            :class:`~spar.deprecations.Deprecation` (or how to write it now); one of
            :data:`RENAMED_SETTINGS`.
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
        lines = "; ".join(_renamed_line(old, renamed[old]) for old in used)
        raise RenamedSettingError(f"{where}: renamed settings: {lines}")


def _renamed_line(old: str, entry: Deprecation | str) -> str:
    return entry.message() if isinstance(entry, Deprecation) else f"{old} is now {entry}"


def reject_renamed_overrides(overrides: Sequence[str], script: str) -> None:
    """For the entry point ``script`` (a config name of :data:`spar.deprecations.COMMANDS`, e.g.
    ``"train"``): exit with the message of :func:`check_renamed`, which names its console
    command (``spar-train``; ``scripts/train.py`` is an alias), without a traceback when the
    command-line ``overrides`` use a renamed setting."""
    try:
        check_renamed(overrides, RENAMED_SETTINGS.get(script, {}), COMMANDS.get(script, script))
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
        _remove_empty_parents(run_dir.parent, Path.cwd())


def _remove_empty_parents(folder: Path, launch_dir: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, below ``launch_dir`` only (the
    default run folder ``outputs/train/<backbone>/<id>`` creates its parents)."""
    folder, launch_dir = folder.resolve(), launch_dir.resolve()
    while launch_dir in folder.parents:
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            return
        folder = folder.parent


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


def _module_name(module: str) -> str:
    """``module``'s import name, also under ``python -m`` (where it runs as ``__main__``)."""
    spec = getattr(sys.modules.get(module), "__spec__", None)
    return spec.name if module == "__main__" and spec is not None else module


def renamed_arguments() -> Callable[[F], F]:
    """Decorate a function whose keyword arguments were renamed: the ``argument`` entries of
    :data:`spar.deprecations.DEPRECATIONS` for ``"<module>.<qualified name>"`` of the function.

    Passing an old keyword raises ``TypeError`` naming the new one (and the release from which
    the old one is unknown), instead of Python's bare "unexpected keyword argument". A function
    with no entry in the table is a mistake, raised when the module is imported.
    """

    def decorate(function: F) -> F:
        where = f"{_module_name(function.__module__)}.{function.__qualname__}"
        renamed = deprecations("argument", where)
        if not renamed:
            raise LookupError(f"renamed_arguments: no argument of {where} in the deprecations")

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            used = [old for old in renamed if old in kwargs]
            if used:
                lines = "; ".join(renamed[old].message() for old in used)
                raise TypeError(f"{function.__qualname__}: renamed arguments: {lines}")
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


#: ``spar.config.is_int`` (renamed): an ImportError naming :func:`is_int_not_bool`.
__getattr__ = module_getattr(__name__)
