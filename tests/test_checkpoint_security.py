"""No file given to spar runs code: hostile pickles of every kind are refused through every entry
point, with an error naming the file, and the code they carry never runs."""

import functools
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from helpers import LightningAttributeDict, register_fake_lightning

from spar.distill import Distiller, OptimSettings, TeacherTargets, TrainerSettings
from spar.models import SlidingWindowTeacher, WeightLoadingError, create_backbone
from spar.models.checkpoint import load_any_checkpoint, read_released_weights, save_checkpoint
from spar.models.weights import read_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")


class TouchesMarker:
    """Unpickling this creates ``marker``: it stands for whatever code an attacker wants run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class RunsAShellCommand:
    """Unpickling this runs ``touch marker`` in a shell."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def lightning_module(monkeypatch):
    register_fake_lightning(monkeypatch)


DOTTED_NAMES = {  # GLOBAL operand -> the argument that makes it create the marker
    "torch._utils os.system": "touch {marker}",  # torch._utils is allowed; its os is not
    "pathlib Path.touch": "{marker}",  # pathlib.Path has a stand-in; its methods do not
}


def dotted_name_pickle(marker, target="torch._utils os.system") -> bytes:
    """``target`` called on one string, in protocol 2 opcodes under a protocol 4 header, so that
    Python's pickle resolves the dotted name attribute by attribute and runs it."""
    argument = DOTTED_NAMES[target].format(marker=marker).encode()
    module, name = target.split()
    global_op = b"c" + f"{module}\n{name}\n".encode()
    string = b"X" + struct.pack("<I", len(argument)) + argument
    return b"\x80\x04" + global_op + string + b"\x85R."


def write_raw_pickle(path, marker):
    path.write_bytes(pickle.dumps({"state_dict": {}, "trap": TouchesMarker(marker)}))


def write_legacy_torch_file(path, marker):
    content = {"model.w": torch.zeros(2), "trap": RunsAShellCommand(marker)}
    torch.save(content, path, _use_new_zipfile_serialization=False)


def write_dotted_name_zip(path, marker, target="torch._utils os.system"):
    """A valid ``torch.save`` zip whose ``data.pkl`` is replaced by :func:`dotted_name_pickle`."""
    payload = dotted_name_pickle(marker, target)
    torch.save({"model.w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as original:
        records = {name: original.read(name) for name in original.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as hostile:
        for name, data in records.items():
            hostile.writestr(name, payload if name.endswith("data.pkl") else data)


def write_lightning_with_trap(path, marker):
    """A Lightning ``.ckpt`` whose hyper-parameters hide a trap two levels down."""
    hyper_parameters = LightningAttributeDict(lr=2e-5, schedule={"warmup": [TouchesMarker(marker)]})
    state = create_backbone("tiny", pretrained=None).state_dict()
    checkpoint = {
        "state_dict": {f"segmentor.net.{k}": v for k, v in state.items()},
        "hyper_parameters": hyper_parameters,
    }
    torch.save(checkpoint, path)


HOSTILE_FILES = {
    "raw-pickle.ckpt": write_raw_pickle,
    "legacy.pth": write_legacy_torch_file,
    "dotted-name.pt": write_dotted_name_zip,
    "dotted-stand-in.pt": functools.partial(write_dotted_name_zip, target="pathlib Path.touch"),
    "lightning.ckpt": write_lightning_with_trap,
}
ENTRY_POINTS = {
    "load_any_checkpoint": lambda path: load_any_checkpoint(create_backbone("tiny"), path),
    "read_released_weights": read_released_weights,
    "create_backbone(checkpoint=)": lambda path: create_backbone("tiny", checkpoint=path),
    "read_state_dict": read_state_dict,
    "create_backbone(pretrained=)": lambda path: create_backbone("tiny", pretrained=str(path)),
}


@pytest.fixture(params=sorted(HOSTILE_FILES))
def hostile(request, tmp_path):
    """(hostile file, the marker its code would create)."""
    path, marker = tmp_path / request.param, tmp_path / "marker"
    HOSTILE_FILES[request.param](path, marker)
    assert path.is_file() and not marker.exists()
    return path, marker


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_hostile_files_are_refused_everywhere(hostile, entry_point):
    path, marker = hostile
    with pytest.raises(WeightLoadingError) as error:
        ENTRY_POINTS[entry_point](path)
    assert str(path) in str(error.value)
    assert "never runs code" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, offending",
    [
        ("dotted-name.pt", "torch._utils.os.system"),
        ("dotted-stand-in.pt", "pathlib.Path.touch"),
        ("lightning.ckpt", "builtins.getattr"),  # how protocol 2 pickles pathlib.Path.touch
    ],
)
def test_refusal_names_the_offending_global(tmp_path, name, offending):
    path = tmp_path / name
    HOSTILE_FILES[name](path, tmp_path / "marker")
    with pytest.raises(WeightLoadingError) as error:
        read_released_weights(path)
    assert f"refused to read {path}: it names {offending}." in str(error.value)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("target", sorted(DOTTED_NAMES))
def test_the_hostile_pickles_do_run_code_under_plain_pickle(tmp_path, target):
    """The refusals above are meaningful: Python's own unpickler runs the payloads."""
    pickle.loads(dotted_name_pickle(tmp_path / "from-dotted-name", target))
    write_raw_pickle(tmp_path / "raw.pkl", tmp_path / "from-raw-pickle")
    pickle.loads((tmp_path / "raw.pkl").read_bytes())
    assert (tmp_path / "from-dotted-name").exists() and (tmp_path / "from-raw-pickle").exists()


def tiny_distiller(out_dir):
    """A Distiller on the tiny backbone with a saved ``checkpoints/last.safetensors``."""
    student = create_backbone("tiny", trainable_blocks="last-2")
    distiller = Distiller(
        student,
        TeacherTargets(SlidingWindowTeacher(create_backbone("tiny")), out_dir),
        views=["unused.jpg"],
        heldout=[],
        out_dir=out_dir,
        optim=OptimSettings(),
        settings=TrainerSettings(epochs=1),
    )
    save_checkpoint(out_dir / "checkpoints" / "last.safetensors", student)
    return distiller


@pytest.mark.parametrize(
    "write_state",
    [
        lambda path, marker: torch.save({"trap": RunsAShellCommand(marker)}, path),
        write_raw_pickle,
        write_dotted_name_zip,
        lambda path, marker: path.write_bytes(b"not a torch file"),
        lambda path, marker: torch.save({"state": {"step": 1}}, path),
    ],
    ids=["hostile", "raw-pickle", "dotted-name", "corrupt", "incomplete"],
)
def test_hostile_or_broken_training_state_is_refused_on_resume(tmp_path, write_state):
    distiller = tiny_distiller(tmp_path)
    state_path, marker = tmp_path / "checkpoints" / "last.state.pt", tmp_path / "marker"
    write_state(state_path, marker)
    with pytest.raises(WeightLoadingError) as error:
        distiller.resume(tmp_path)
    assert str(state_path) in str(error.value)
    assert not marker.exists()


def test_training_state_needs_no_stand_ins_and_round_trips(tmp_path):
    distiller = tiny_distiller(tmp_path)
    state_path = tmp_path / "checkpoints" / "last.state.pt"
    np.random.seed(5)
    distiller.save()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(state_path) == []
    expected = np.random.rand(3)
    np.random.seed(6)
    distiller.resume(tmp_path)
    np.testing.assert_array_equal(np.random.rand(3), expected)
