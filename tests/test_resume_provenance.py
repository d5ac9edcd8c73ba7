"""A resumed training run is proven to come from the same settings, data and weights: every
checkpoint records a fingerprint, ``resume=`` checks it before the cache fill, ``resume_allow``
lets named keys change (applied, and recorded with the step), and the folders a run writes and
a held-out folder that overlaps the training images are refused before any model is built."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import script_environment, train_config, write_scene_images
from safetensors.torch import save_file

import spar.configs  # noqa: F401  (registers the structured configs that train.yaml names)
from spar.config import SettingError
from spar.distill import HookBase, run_distillation
from spar.distributed import register_run_id_resolver
from spar.models import create_backbone
from spar.models.weights import read_safetensors_metadata, read_weight_file
from spar.provenance import ProvenanceError, weights_digest

register_run_id_resolver()

# 4 images: 3 trained on (one view each: 3 optimizer steps an epoch), the last held out.
SMALL = (
    "train_images.augment.bounds=[160,128]",
    "train_images.augment.min_crop=64",
    "train_images.augment.min_short_side=64",
    "train_images.draws_per_image=1",
    "heldout.num_images=1",
    "heldout.sizes=[[160,128]]",
    "teacher.window=96",
    "teacher.stride=24",
    "trainer.epochs=1",
    "optim.lr=1e-3",
    "optim.schedule=cosine",
)


def config(tmp_path, images, *overrides):
    return train_config(tmp_path, f"train_images.root={images}", *SMALL, *overrides)


def run(tmp_path, images, name, *overrides, hooks=()):
    return run_distillation(config(tmp_path, images, *overrides), tmp_path / name, hooks=hooks)


def extra_of(path):
    return json.loads(read_safetensors_metadata(path)["extra"])


def cache_entries(folder):
    return sorted(folder.rglob("*.safetensors")) if folder.exists() else []


class Built(Exception):
    """Raised instead of building a model: the run got past every early check."""


@pytest.fixture
def no_model(monkeypatch):
    """``create_backbone`` in the run raises :class:`Built`: an error raised instead came before
    any model was built."""

    def refuse(*args, **kwargs):
        raise Built

    monkeypatch.setattr("spar.distill.run.create_backbone", refuse)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run (lr 1e-3, cosine over 3 steps) stopped after its first step; tests resume it into
    other folders, which leaves it as it is."""
    tmp_path = tmp_path_factory.mktemp("stopped")
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    run(tmp_path, images, "part", "trainer.stop_after_steps=1")
    return tmp_path, images, tmp_path / "part"


# -- what a checkpoint records -------------------------------------------------------------------


def test_every_checkpoint_records_the_fingerprint_of_settings_data_teacher_and_base_weights(
    stopped, tmp_path
):
    base, images, _ = stopped
    summary = run(tmp_path, images, "full", "train_images.max_images=1")  # one step, one epoch
    checkpoints = tmp_path / "full" / "checkpoints"
    last = extra_of(checkpoints / "last.safetensors")
    assert extra_of(checkpoints / "best.safetensors")["fingerprint"] == last["fingerprint"]
    state = read_weight_file(checkpoints / "last.state.pt")
    assert state["extra"]["fingerprint"] == last["fingerprint"]
    fingerprint = last["fingerprint"]
    assert fingerprint["optim.lr"] == 0.001 and fingerprint["optim.schedule"] == "cosine"
    assert fingerprint["teacher.window"] == [96, 96] and fingerprint["teacher.stride"] == [24, 24]
    assert fingerprint["teacher.dtype"] == "float32"
    assert fingerprint["trainer.precision"] == "float32"  # "auto" resolved on the CPU
    assert fingerprint["trainer.epochs"] == 1 and fingerprint["trainer.seed"] == 0
    assert fingerprint["train_images"].startswith("1 images, ")
    assert fingerprint["heldout"].startswith("1 images, ")
    for speed_or_display in (
        "trainer.num_workers",
        "trainer.log_every",
        "trainer.show_progress",
        "trainer.stop_after_steps",
        "device",
        "resume",
        "resume_allow",
        "teacher.cache_dir",
        "teacher.batch_size",
        "train_images.root",
    ):
        assert speed_or_display not in fingerprint
    # the base weights, before training: those of a fresh tiny backbone, not the trained ones
    fresh = create_backbone("tiny", pretrained=None)
    assert fingerprint["weights"] == weights_digest(fresh)
    trained = create_backbone("tiny", pretrained=None, checkpoint=summary["checkpoint"])
    assert fingerprint["weights"] != weights_digest(trained)
    assert last["changes"] == [] and summary["changes"] == []


# -- what resume refuses --------------------------------------------------------------------------


def test_a_changed_learning_rate_is_refused_in_one_line_before_the_cache_fill(stopped, tmp_path):
    base, images, part = stopped
    cache = tmp_path / "fresh_cache"
    with pytest.raises(ProvenanceError) as error:
        run(tmp_path, images, "r", f"resume={part}", "optim.lr=1e-2", f"teacher.cache_dir={cache}")
    message = str(error.value)
    assert "optim.lr: 0.001 -> 0.01" in message and "resume_allow" in message
    assert str(part / "checkpoints" / "last.state.pt") in message
    assert "\n" not in message
    assert cache_entries(cache) == []  # stopped before any teacher map was computed
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_changed_teacher_stride_is_refused(stopped, tmp_path):
    base, images, part = stopped
    stride = r"teacher\.stride: \[24, 24\] -> \[16, 16\]"
    with pytest.raises(ProvenanceError, match=stride) as error:
        run(tmp_path, images, "r", f"resume={part}", "teacher.stride=16")
    assert "optim.lr" not in str(error.value)


def test_a_moved_split_is_refused(tmp_path):
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    run(tmp_path, images, "part", "trainer.stop_after_steps=1")
    # one image removed, another added last: the held-out image would become training data
    (images / "scene_00.jpg").unlink()
    shutil.copy(images / "scene_01.jpg", images / "scene_99.jpg")
    with pytest.raises(ProvenanceError) as error:
        run(tmp_path, images, "r", f"resume={tmp_path / 'part'}")
    message = str(error.value)
    assert "train_images: 3 images, " in message and "heldout: 1 images, " in message


def test_other_base_weights_of_the_same_shapes_are_refused_a_moved_file_is_not(tmp_path):
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    weights = tmp_path / "base.safetensors"

    def write_base(seed, path):
        state = create_backbone("tiny", pretrained=None, seed=seed).model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    write_base(0, weights)
    one = ("train_images.max_images=1", "trainer.epochs=1")  # one step
    part = tmp_path / "part"
    run(tmp_path, images, "part", f"backbone.pretrained={weights}", *one)
    moved = tmp_path / "moved.safetensors"
    shutil.copy(weights, moved)
    write_base(1, weights)  # the same path, other weights of the same shapes
    with pytest.raises(ProvenanceError, match=r"differing: weights: \w+ -> \w+ \("):
        run(tmp_path, images, "r", f"backbone.pretrained={weights}", *one, f"resume={part}")
    resumed = run(
        tmp_path,
        images,
        "part",
        f"backbone.pretrained={moved}",
        "train_images.max_images=1",
        "trainer.epochs=2",  # one more epoch (one step)
        f"resume={part}",
        "resume_allow=[trainer.epochs]",
    )
    assert resumed["steps"] == 2
    assert resumed["changes"] == [{"key": "trainer.epochs", "old": 1, "new": 2, "step": 1}]


def test_resume_allow_must_name_a_recorded_key_and_needs_resume(stopped, tmp_path):
    base, images, part = stopped
    with pytest.raises(ProvenanceError, match="optim.rl"):
        run(tmp_path, images, "r", f"resume={part}", "optim.lr=1e-2", "resume_allow=[optim.rl]")
    with pytest.raises(SettingError, match="without resume"):
        run(tmp_path, images, "r", "resume_allow=[optim.lr]")


def test_a_checkpoint_without_a_fingerprint_is_refused(stopped, tmp_path):
    base, images, part = stopped
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    state = read_weight_file(part / "checkpoints" / "last.state.pt")
    del state["extra"]["fingerprint"]
    torch.save(state, old / "last.state.pt")
    with pytest.raises(ProvenanceError, match="records no fingerprint"):
        run(tmp_path, images, "r", f"resume={old.parent}")


# -- resume_allow: the change is applied and recorded ----------------------------------------------


class LearningRates(HookBase):
    """The learning rate the optimizer holds before each step, and the scheduler's report."""

    def __init__(self):
        self.rates = []

    def before_step(self):
        optimization = self.trainer.optimization
        group = optimization.optimizer.param_groups[0]
        self.rates.append((self.trainer.state.step + 1, group["lr"], optimization.learning_rate))


def test_an_allowed_learning_rate_is_applied_and_recorded_with_its_step(stopped, tmp_path):
    base, images, part = stopped
    rates = LearningRates()
    with pytest.warns(UserWarning, match=r"optim\.lr: 0\.001 -> 0\.01"):
        summary = run(
            tmp_path,
            images,
            "r",
            f"resume={part}",
            "optim.lr=1e-2",
            "resume_allow=[optim.lr]",
            "trainer.stop_after_steps=2",
            hooks=[rates],
        )
    # cosine over 3 steps from the new rate: 0.01 * (1 + cos(pi * k / 3)) / 2 at steps k = 1
    expected = 0.01 * (1 + math.cos(math.pi / 3)) / 2
    assert rates.rates == [(2, pytest.approx(expected, rel=1e-12), pytest.approx(expected))]
    change = {"key": "optim.lr", "old": 0.001, "new": 0.01, "step": 1}
    assert summary["changes"] == [change]
    log = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert {"event": "resume_changes", "step": 1, "changes": [change]} in records
    train = [r for r in records if r["event"] == "train"]
    # the log reports the rate after the step's scheduler update: k = 2
    after = 0.01 * (1 + math.cos(2 * math.pi / 3)) / 2
    assert [(r["step"], r["lr"]) for r in train] == [(2, pytest.approx(after))]
    last = extra_of(tmp_path / "r" / "checkpoints" / "last.safetensors")
    assert last["changes"] == [change] and last["fingerprint"]["optim.lr"] == 0.01
    state = read_weight_file(tmp_path / "r" / "checkpoints" / "last.state.pt")
    assert state["extra"]["changes"] == [change]

    # a second resume: the same settings pass unchanged; another allowed change accumulates
    rates = LearningRates()
    summary = run(
        tmp_path,
        images,
        "r",
        f"resume={tmp_path / 'r'}",
        "optim.lr=1e-2",
        "optim.weight_decay=0.5",
        "resume_allow=[optim]",
        hooks=[rates],
    )
    second = {"key": "optim.weight_decay", "old": 0.0001, "new": 0.5, "step": 2}
    assert summary["changes"] == [change, second] and summary["steps"] == 3
    expected = 0.01 * (1 + math.cos(2 * math.pi / 3)) / 2
    assert rates.rates == [(3, pytest.approx(expected, rel=1e-12), pytest.approx(expected))]
    last = extra_of(tmp_path / "r" / "checkpoints" / "last.safetensors")
    assert last["changes"] == [change, second]
    assert last["fingerprint"]["optim.weight_decay"] == 0.5


def test_an_allowed_weight_decay_reaches_the_optimizer(stopped, tmp_path):
    base, images, part = stopped

    class Decay(HookBase):
        def __init__(self):
            self.seen = []

        def before_step(self):
            self.seen.append(self.trainer.optimization.optimizer.param_groups[0]["weight_decay"])

    hook = Decay()
    run(
        tmp_path,
        images,
        "r",
        f"resume={part}",
        "optim.weight_decay=0.25",
        "resume_allow=[optim.weight_decay]",
        "trainer.stop_after_steps=2",
        hooks=[hook],
    )
    assert hook.seen == [0.25]


# -- held-out folder and writable folders, before any model is built -------------------------------


def test_a_heldout_folder_overlapping_the_training_images_is_refused_before_any_model(
    tmp_path, no_model
):
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    with pytest.raises(SettingError, match="is the training folder"):
        run(tmp_path, images, "r", f"heldout.root={images}")
    (tmp_path / "link").symlink_to(images)
    with pytest.raises(SettingError, match="is the training folder"):
        run(tmp_path, images, "r", f"heldout.root={tmp_path / 'link'}")
    copies = tmp_path / "copies"
    copies.mkdir()
    shutil.copy(images / "scene_02.jpg", copies / "other_name.jpg")  # the same bytes
    with pytest.raises(SettingError, match=r"1 held-out image\(s\) are also training images"):
        run(tmp_path, images, "r", f"heldout.root={copies}")
    # other images are a held-out folder: the run goes on to build its models
    other = write_scene_images(tmp_path / "other", count=2, size=(120, 150))
    with pytest.raises(Built):
        run(tmp_path, images, "r", f"heldout.root={other}")


def test_an_unwritable_run_folder_or_cache_folder_is_refused_before_any_model(tmp_path, no_model):
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a file is unwritable, for root too
    with pytest.raises(SettingError, match=r"^the run folder .*a_file is not a folder"):
        run_distillation(config(tmp_path, images), blocker / "run")
    with pytest.raises(SettingError, match=r"^teacher\.cache_dir .*a_file is not a folder"):
        run(tmp_path, images, "r", f"teacher.cache_dir={blocker / 'cache'}")
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(Built):  # no cache: its folder is not written, so not checked
        run(tmp_path, images, "r", f"teacher.cache_dir={blocker / 'cache'}", "teacher.cache=false")


def _sysfs_refuses_files() -> bool:
    try:
        handle, path = tempfile.mkstemp(dir="/sys")
    except OSError:
        return os.path.isdir("/sys/kernel")
    os.close(handle)
    os.unlink(path)
    return False


@pytest.mark.skipif(not _sysfs_refuses_files(), reason="needs Linux sysfs, where no file is made")
def test_a_folder_nobody_may_write_is_refused_before_any_model(tmp_path, no_model):
    """sysfs refuses new files to root as well: the probe, not a mode check, finds it."""
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    with pytest.raises(SettingError, match=r"^the run folder /sys/spar-run is not writable"):
        run_distillation(config(tmp_path, images), "/sys/spar-run")
    with pytest.raises(SettingError, match=r"^teacher\.cache_dir /sys/spar-c is not writable"):
        run(tmp_path, images, "r", "teacher.cache_dir=/sys/spar-c")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("which", ["run", "cache"])
def test_a_read_only_folder_is_refused_before_any_model(tmp_path, no_model, which):
    images = write_scene_images(tmp_path / "images", count=4, size=(128, 160))
    folder = tmp_path / which
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SettingError, match="is not writable"):
            if which == "run":
                run_distillation(config(tmp_path, images), folder)
            else:
                run(tmp_path, images, "r", f"teacher.cache_dir={folder}")
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
def test_the_script_prints_one_error_line_for_a_refused_resume(stopped, tmp_path):
    base, images, part = stopped
    overrides = [f"train_images.root={images}", *SMALL, "trainer.num_workers=0", "device=cpu"]
    overrides += [f"teacher.cache_dir={base / 'cache'}", f"hydra.run.dir={tmp_path / 'r'}"]
    result = subprocess.run(
        [sys.executable, "-m", "spar.train", *overrides, f"resume={part}", "teacher.stride=16"],
        capture_output=True,
        text=True,
        timeout=300,
        env=script_environment(os.environ),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot resume: ") and "teacher.stride" in lines[-1]
    assert "Traceback" not in result.stderr
