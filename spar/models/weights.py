"""Reading weight files without running code from them, and loading them strictly, with errors
that name what does not fit."""

from __future__ import annotations

import contextlib
import pickle
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
#: ``AttributeDict`` becomes a plain dict, builtins are themselves, omegaconf configs (saved
#: hyper-parameters), ``typing.Any`` and paths become inert stand-ins.
STAND_INS: dict[str, object] = {
    **{name: dict for name in _LIGHTNING_ATTRIBUTE_DICT},
    **{f"builtins.{kind.__name__}": kind for kind in _BUILTINS},
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
    refused = _refused_globals(path) if _is_zip(path) else []
    if refused:
        raise _refusal(path, f"it names {', '.join(refused)}")
    try:
        with torch.serialization.safe_globals([(v, k) for k, v in STAND_INS.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, _unpickler_reason(error)) from error
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise WeightLoadingError(f"cannot read weight file {path}: {error}") from error


def read_weight_file(path: str | Path) -> Any:
    """The content of a ``.safetensors`` file (a dict of tensors) or of a ``torch.save`` file.

    The one way spar reads a weight or state file: a torch file is read with
    ``weights_only=True`` and only the STAND_INS besides torch's own globals; a file naming
    anything else is refused with a :class:`WeightLoadingError` naming the file.
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
    module.load_state_dict(state, strict=not partial)
