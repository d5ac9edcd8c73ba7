"""save_pretrained replaces a folder as a whole (a kill leaves it entirely old or entirely new,
nothing temporary inside it) and from_pretrained checks the folder against its manifest."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spar.models import create_backbone, from_pretrained, save_pretrained
from spar.models import pretrained as pretrained_module
from spar.models.weights import WeightLoadingError

ROOT = Path(__file__).resolve().parents[1]
SAVED = ["README.md", "config.json", "manifest.json", "model.safetensors"]


def _student(seed: int):
    backbone = create_backbone("tiny", pretrained=None, trainable_blocks="last-1")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return backbone


@pytest.fixture(scope="module")
def students():
    return _student(1), _student(2)


def _contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# The child of a kill trial: saves the student of seed 2 into a folder and kills itself
# (SIGKILL) at one step. A fresh interpreter, not a fork: a forked child of a process whose
# thread pools ran can hang in torch.
KILLED_SAVE = """
import os, signal, sys
import torch
from spar.models import create_backbone, save_pretrained
from spar.models import pretrained as module

folder, where = sys.argv[1], sys.argv[2]
backbone = create_backbone("tiny", pretrained=None, trainable_blocks="last-1")
generator = torch.Generator().manual_seed(2)
with torch.no_grad():
    for param in backbone.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))
kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if where == "writing":  # the weights are written, config and manifest not yet
    module.atomic_write_json = kill
elif where == "between renames":
    rename, renamed = os.rename, []
    def second_rename_kills(source, destination):
        renamed.append(source)
        if len(renamed) == 2:
            kill()
        rename(source, destination)
    module.os.rename = second_rename_kills
else:  # swapped in, the earlier folder not yet removed
    module.shutil.rmtree = kill
save_pretrained(backbone, folder)
"""


def _killed_save(folder, where: str) -> int:
    """Save the student of seed 2 into ``folder`` in a child process that kills itself at
    ``where``; its return code (``-SIGKILL`` when killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", KILLED_SAVE, str(folder), where]
    return subprocess.run(command, env=env, capture_output=True, timeout=120).returncode


def _siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.mark.slow  # a fresh interpreter per kill: 3 to 12 s each on the 2-core machine
@pytest.mark.parametrize("where", ["writing", "between renames", "after the swap"])
def test_a_kill_leaves_the_folder_entirely_old_or_entirely_new(students, tmp_path, where):
    old_student, new_student = students
    folder = tmp_path / "student"
    save_pretrained(old_student, folder)
    old = _contents(folder)
    reference = save_pretrained(new_student, tmp_path / "reference")
    new = {**_contents(reference)}

    assert _killed_save(folder, where) == -signal.SIGKILL

    if where == "between renames":  # the old folder is renamed away, the new one not yet in
        assert not folder.exists()
        leftovers = _siblings(folder)
        assert [n.split("~")[0] for n in leftovers] == [
            ".student.old",
            ".student.saving",
            "reference",
        ]
        with pytest.raises(FileNotFoundError, match=r"interrupted .*\.student\.old~.*save again"):
            from_pretrained(folder)
    else:
        contents = _contents(folder)
        assert contents == (old if where == "writing" else new)  # every file old, or every new
        assert sorted(contents) == SAVED  # nothing temporary inside the folder
        with pytest.warns(UserWarning, match="interrupted save_pretrained left .student"):
            loaded = from_pretrained(folder)
        expected = old_student if where == "writing" else new_student
        for name, tensor in expected.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name

    with pytest.warns(UserWarning, match="removed what an interrupted save_pretrained left"):
        save_pretrained(new_student, folder)
    assert _siblings(folder) == ["reference"]
    assert _contents(folder) == new


def test_an_error_while_writing_leaves_the_old_folder_and_nothing_beside_it(
    students, tmp_path, monkeypatch
):
    old_student, new_student = students
    folder = save_pretrained(old_student, tmp_path / "student")
    old = _contents(folder)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrained_module, "atomic_write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(new_student, folder)
    assert _contents(folder) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_failed_swap_puts_the_old_folder_back(students, tmp_path, monkeypatch):
    old_student, new_student = students
    folder = save_pretrained(old_student, tmp_path / "student")
    old = _contents(folder)
    rename, calls = os.rename, []

    def second_rename_fails(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", str(destination))
        rename(source, destination)

    monkeypatch.setattr(pretrained_module.os, "rename", second_rename_fails)
    with pytest.raises(PermissionError):
        save_pretrained(new_student, folder)
    monkeypatch.undo()
    assert _contents(folder) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_sibling_of_a_running_save_is_not_removed(students, tmp_path):
    folder = save_pretrained(students[0], tmp_path / "student")
    host = pretrained_module._host()
    running = tmp_path / f".student.saving~{host}~{os.getpid()}~0123abcd"  # this process: alive
    running.mkdir()
    dead = tmp_path / f".student.saving~{host}~999999999~0123abcd"  # no such process
    dead.mkdir()
    with pytest.warns(UserWarning, match=r"\.student\.saving~.*~999999999~"):
        save_pretrained(students[1], folder)
    assert running.is_dir() and not dead.exists()


def test_the_manifest_records_the_digest_of_each_file_the_model_is_loaded_from(students, tmp_path):
    folder = save_pretrained(students[0], tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("model.safetensors", "config.json"):
        expected = hashlib.blake2b((folder / name).read_bytes(), digest_size=16).hexdigest()
        assert manifest["files"][name] == expected
    assert "README.md" not in manifest["files"]  # the card may be edited before uploading
    assert manifest["fingerprint"]["backbone"] == "tiny"
    assert manifest["fingerprint"]["trainable_blocks"] == [3]
    again = json.loads((save_pretrained(students[0], tmp_path / "b") / "manifest.json").read_text())
    other = json.loads((save_pretrained(students[1], tmp_path / "c") / "manifest.json").read_text())
    assert again["fingerprint"]["weights"] == manifest["fingerprint"]["weights"]
    assert other["fingerprint"]["weights"] != manifest["fingerprint"]["weights"]


def test_a_swapped_weight_file_is_refused_naming_it(students, tmp_path):
    first = save_pretrained(students[0], tmp_path / "first")
    second = save_pretrained(students[1], tmp_path / "second")
    shutil.copyfile(second / "model.safetensors", first / "model.safetensors")
    with pytest.raises(WeightLoadingError) as error:
        from_pretrained(first)
    message = str(error.value)
    assert f"{first / 'model.safetensors'} does not match {first / 'manifest.json'}" in message
    assert "\n" not in message
    (first / "README.md").write_text("edited card")  # not a file the model is loaded from
    shutil.copyfile(second / "model.safetensors", first / "model.safetensors")
    shutil.copyfile(second / "config.json", first / "config.json")
    shutil.copyfile(second / "manifest.json", first / "manifest.json")
    from_pretrained(first)  # a consistent folder loads


def test_a_folder_holding_other_files_is_refused_untouched(students, tmp_path):
    folder = tmp_path / "repo"
    (folder / ".git").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"repo: it holds other files \(\.git, notes\.txt\)"):
        save_pretrained(students[0], folder)
    assert sorted(p.name for p in folder.iterdir()) == [".git", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_a_symlinked_folder_is_replaced_where_it_points(students, tmp_path):
    real = save_pretrained(students[0], tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_pretrained(students[1], link)
    assert link.is_symlink() and _contents(real) == _contents(link)
    loaded = from_pretrained(link)
    for name, tensor in students[1].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
