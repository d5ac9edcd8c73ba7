"""Reading weight files without running code from them, and loading them strictly, with errors
that name what does not fit."""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class WeightLoadingError(ValueError):
    """A weight file is missing, unreadable, or its keys or shapes do not fit the model."""


def looks_like_path(value: str) -> bool:
    """True for strings that are meant as a file path rather than a pretrained tag."""
    return "/" in value or "\\" in value or value.endswith(WEIGHT_FILE_SUFFIXES)


HF_HUB_PREFIX = "hf-hub:"


def is_hub_id(value: str) -> bool:
    """True when ``value`` names a Hugging Face hub repository rather than a local path.

    The rule: ``hf-hub:org/name`` always names the hub. Otherwise ``value`` is a hub id when it
    is ``org/name``: exactly one ``/``, both parts non-empty, no ``\\``, not starting with
    ``.``, ``~`` or ``/``, not ending in a file suffix (``.safetensors``, ``.pt``, ``.json``,
    ...), and ``org`` is not a folder here. Anything else is a local path, so a missing
    ``students/siglip2`` (``students/`` exists) is reported as missing, never looked up on the hub.
    """
    if value.startswith(HF_HUB_PREFIX):
        return True
    parts = value.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and "\\" not in value
        and not value.startswith((".", "~"))
        and not value.endswith((*WEIGHT_FILE_SUFFIXES, ".json"))
        and not Path(parts[0]).is_dir()
    )


# -- reading files without running code ----------------------------------------------------------
#
# Every torch file is read by torch's weights-only unpickler: tensors, plain Python values and
# the globals torch allows by default. Released PyTorch Lightning ``.ckpt`` files also pickle a
# few library objects besides the weights (hyper-parameters, callbacks, loop state); STAND_INS
# names each of them exactly and gives what the unpickler builds in its place. A file naming
# any other global is refused before it is unpickled; no code from a file is ever run.


class _Inert:
    """Stands in for a class a file names: keeps the arguments and state the file gives it.

    It defines nothing else, so building one runs neither code of the file nor of the real
    class (which is never imported). ``stands_for`` is the full name it replaces.
    """

    stands_for = ""

    def __new__(cls, *args):
        inert = super().__new__(cls)
        inert.args = args
        return inert

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.stands_for}>"


def _inert(full_name: str) -> type:
    """An :class:`_Inert` subclass standing in for the class called ``full_name``."""
    return type(full_name.rsplit(".", 1)[1], (_Inert,), {"stands_for": full_name})


def _plain_dict(default_factory=None) -> dict:
    """Stands in for ``collections.defaultdict``: a plain dict (the weights-only unpickler fills
    only exact dicts), and the factory is dropped, never called."""
    return {}


#: Objects the stand-ins for builtins may build per byte of the file being read (see
#: :func:`_bounded_call`): whatever its opcodes, unpickling a file costs a small multiple of
#: its size.
UNPICKLING_BUDGET_PER_BYTE = 4
_PLAIN_VALUES = (type(None), bool, int, float, complex, str, bytes)
_CONTAINERS = (dict, list, tuple, set, frozenset)
_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("unpickling_budget")


def _object_count(value: Any) -> int:
    """Objects ``value`` gives a builtin to copy: its length for strings and containers."""
    return len(value) if isinstance(value, (str, bytes, *_CONTAINERS)) else 1


def _bounded_call(kind: type, args: tuple) -> Any:
    """``kind(*args)`` for a builtin ``kind``, refused unless it is cheap.

    A scalar (``str``, ``int``, ...) is only built from plain values: ``str`` of a memoised
    nested list would write out every shared copy (exponential in the file size). A container
    is only built from a plain value or a container, and what it copies is counted against the
    budget of the file being read (``UNPICKLING_BUDGET_PER_BYTE`` objects per byte).
    """
    allowed = _PLAIN_VALUES + (_CONTAINERS if kind in _CONTAINERS else ())
    for arg in args:
        if not isinstance(arg, allowed):
            raise pickle.UnpicklingError(
                f"builtins.{kind.__name__} applied to a {type(arg).__name__} (stand-ins for "
                "builtins take plain values only)"
            )
    budget = _budget.get([0])
    budget[0] -= 1 + sum(_object_count(arg) for arg in args)
    if budget[0] < 0:
        raise pickle.UnpicklingError(
            f"it builds more than {UNPICKLING_BUDGET_PER_BYTE} objects per byte of the file"
        )
    return kind(*args)


def _bounded(kind: type) -> type:
    """A stand-in for the builtin ``kind``: calling it (or ``__new__``, as the unpickler's
    NEWOBJ does) returns ``kind(*args)``, an exact builtin, through :func:`_bounded_call`."""
    return type(kind.__name__, (), {"__new__": lambda cls, *args: _bounded_call(kind, args)})


_LIGHTNING_ATTRIBUTE_DICT = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)
_BUILTINS = (dict, list, tuple, set, frozenset, int, float, str, bool)
_INERT = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    "typing.Any",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib._local.Path",  # the names Python 3.13 pickles paths under
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
)
#: Exact full name in a file -> what the weights-only unpickler builds for it. Lightning's
#: ``AttributeDict`` becomes a plain dict, builtins are themselves (built by :func:`_bounded`:
#: from plain values, within the file's budget), omegaconf configs (saved hyper-parameters),
#: ``typing.Any`` and paths become inert stand-ins.
STAND_INS: dict[str, object] = {
    **{name: _bounded(dict) for name in _LIGHTNING_ATTRIBUTE_DICT},
    **{f"builtins.{kind.__name__}": _bounded(kind) for kind in _BUILTINS},
    "collections.defaultdict": _plain_dict,
    **{name: _inert(name) for name in _INERT},
}
_NEVER_RUNS_CODE = (
    "spar never runs code from a file: it reads tensors, plain values and the stand-ins in "
    "spar.models.weights.STAND_INS only. If you trust this file, convert its weights to "
    ".safetensors in a separate step and pass that"
)


def _is_zip(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _refusal(path: Path, reason: str) -> WeightLoadingError:
    return WeightLoadingError(f"refused to read {path}: {reason}. {_NEVER_RUNS_CODE}")


def _refused_globals(path: Path) -> list[str]:
    """Globals named in the pickle of the zip file ``path`` besides STAND_INS and those torch
    allows (its defaults, and any the application added with ``add_safe_globals``).

    The scan reads the pickle's opcodes and runs nothing.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except pickle.UnpicklingError as error:
        raise _refusal(path, str(error).rstrip(".")) from error
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error
    return sorted(set(found) - set(STAND_INS))


#: Globals torch's weights-only unpickler allows by default that build objects of any size from
#: a few bytes (``bytearray(10**12)``); no weight file spar reads needs them.
AMPLIFYING_TORCH_GLOBALS = ("builtins.bytearray",)


def _amplifying_globals(path: Path) -> list[str]:
    """The :data:`AMPLIFYING_TORCH_GLOBALS` named (by GLOBAL opcodes, the only way the
    weights-only unpickler imports) in the pickle of the zip file ``path``; nothing is run."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        data = archive.read(name) if name else b""
    named = set()
    with contextlib.suppress(ValueError):  # a broken pickle: the unpickler reports it
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                named.add(argument.replace(" ", "."))
    return sorted(named & set(AMPLIFYING_TORCH_GLOBALS))


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, without torch's advice to allow more."""
    original = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    return str(original).split(". ")[0].rstrip(".")


def _read_torch_file(path: Path) -> Any:
    """The object in a ``torch.save`` file, read with ``weights_only=True`` and STAND_INS.

    Zip files (``torch.save``'s format since torch 1.6) are scanned first and refused if they
    name any other global. Legacy files and raw pickles cannot be scanned; the weights-only
    unpickler itself refuses them then. Either way the error names the file.
    """
    if _is_zip(path):
        _check_zip_expansion(path)
    refused = _refused_globals(path) + _amplifying_globals(path) if _is_zip(path) else []
    if refused:
        raise _refusal(path, f"it names {', '.join(refused)}")
    token = _budget.set([UNPICKLING_BUDGET_PER_BYTE * path.stat().st_size])
    try:
        with torch.serialization.safe_globals([(v, k) for k, v in STAND_INS.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, _unpickler_reason(error)) from error
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error
    finally:
        _budget.reset(token)


#: How many times its own size a zip weight file may expand to; ``torch.save`` stores its
#: entries uncompressed (about 1x), so only re-compressed files come near it. The environment
#: variable ``SPAR_MAX_ZIP_EXPANSION`` overrides it.
MAX_ZIP_EXPANSION = 16.0


def max_zip_expansion() -> float:
    """``SPAR_MAX_ZIP_EXPANSION`` when set (a number > 0), else :data:`MAX_ZIP_EXPANSION`."""
    value = os.environ.get("SPAR_MAX_ZIP_EXPANSION")
    if value is None:
        return MAX_ZIP_EXPANSION
    try:
        limit = float(value)
    except ValueError:
        limit = 0.0
    if not limit > 0:
        raise WeightLoadingError(f"SPAR_MAX_ZIP_EXPANSION must be a number > 0, got {value!r}")
    return limit


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _check_zip_expansion(path: Path) -> None:
    """Refuse a zip whose directory declares entries far larger than the file, before any entry
    is read (the reader allocates what the directory declares, and no more)."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError) as error:
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error
    size = path.stat().st_size
    limit = max_zip_expansion()
    if declared > limit * size:
        raise WeightLoadingError(
            f"refused to read {path}: its zip entries expand to {_megabytes(declared)}, more "
            f"than {limit:g} times the file's {_megabytes(size)} (a compressed archive; set "
            "SPAR_MAX_ZIP_EXPANSION to allow more)"
        )


def read_weight_file(path: str | Path) -> Any:
    """The content of a ``.safetensors`` file (a dict of tensors) or of a ``torch.save`` file.

    The one way spar reads a weight or state file: a torch file is read with
    ``weights_only=True`` and only the STAND_INS besides torch's own globals; a file naming
    anything else is refused with a :class:`WeightLoadingError` naming the file. Reading is
    bounded by the file's size: a zip whose entries expand past ``SPAR_MAX_ZIP_EXPANSION``
    (default 16) times the file is refused before any entry is read, and the stand-ins build
    at most ``UNPICKLING_BUDGET_PER_BYTE`` objects per byte, from plain values only.
    """
    path = _existing(path)
    if path.suffix != ".safetensors":
        return _read_torch_file(path)
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error


def read_safetensors_with_metadata(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a ``.safetensors`` file."""
    with _safetensors(path) as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file; no tensor is read."""
    with _safetensors(path) as file:
        return file.metadata() or {}


@contextlib.contextmanager
def _safetensors(path: str | Path) -> Iterator[Any]:
    """An open ``safe_open`` handle; any failure to read becomes a WeightLoadingError."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            yield file
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightLoadingError(f"weight file not found: {path}")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file.

    A ``torch.save`` file may hold the state dict itself or nest it under ``"state_dict"`` or
    ``"model"``; a ``"module."`` prefix left by DistributedDataParallel is removed.
    """
    state = read_weight_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightLoadingError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, partial: bool = False
) -> None:
    """Load ``state`` into ``module``; on any mismatch raise one error listing all problems.

    Args:
        module: the model to fill.
        state: parameter name -> tensor.
        source: where the weights came from (a file name), quoted in the error.
        partial: ``state`` may cover only part of the module (e.g. the trained blocks of a
            SPAR checkpoint); its keys and shapes must still all fit.
    """
    expected = module.state_dict()
    missing = [] if partial else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_summarise(wrong_shape)}")
    if problems:
        raise WeightLoadingError(
            f"weights from {source} do not fit the model; " + "; ".join(problems)
        )
    check_weight_values(state, expected, source)
    module.load_state_dict(state, strict=not partial)


def check_weight_values(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
) -> None:
    """Refuse weights that would load without a word but are not weights: a tensor holding NaN
    or inf, or a non-floating tensor (e.g. int64) where the model's tensor is floating.

    Called by :func:`load_state_dict_strict` (so by every load: ``checkpoint=``, local
    ``pretrained=`` files, ``from_pretrained``, refinement weights and resume), after the keys
    and shapes were checked, so it reads at most the model's size.

    Args:
        state: name -> tensor from the file (any shapes).
        expected: the model's ``state_dict``; only names in both are checked.
        source: the file (and setting) the weights came from, quoted in the error.

    Raises:
        WeightLoadingError: one line naming the source and every offending tensor.
    """
    not_floating, not_finite = [], []
    for name in sorted(set(state) & set(expected)):
        tensor = state[name]
        if not expected[name].is_floating_point():
            continue
        if not tensor.is_floating_point():
            not_floating.append(f"{name} ({tensor.dtype})")
        elif not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            not_finite.append(f"{name} ({bad} of {tensor.numel()} values)")
    problems = []
    if not_floating:
        problems.append(
            f"non-floating tensors where the model's are floating: {_summarise(not_floating)}"
        )
    if not_finite:
        problems.append(f"tensors holding NaN or inf: {_summarise(not_finite)}")
    if problems:
        raise WeightLoadingError(f"refused the weights from {source}: " + "; ".join(problems))


def _floating_tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every floating tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floating_tensors(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _floating_tensors(item, f"{where}.{index}" if where else str(index))


def check_finite_tensors(value: Any, source: str) -> None:
    """Refuse NaN or inf in any floating tensor of ``value`` (nested dicts / lists / tuples, e.g.
    an optimizer's ``state_dict`` read from a training state on resume).

    Args:
        value: what was read from the file.
        source: the file and entry, quoted in the error (e.g. ``"last.state.pt (optimizer)"``).

    Raises:
        WeightLoadingError: one line naming ``source`` and the offending entries
            (e.g. ``state.0.exp_avg``).
    """
    bad = [
        f"{where} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)"
        for where, tensor in _floating_tensors(value, "")
        if not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise WeightLoadingError(f"refused {source}: tensors holding NaN or inf: {_summarise(bad)}")
