"""What a newcomer meets first: readable captions, a script's --help, short errors for user
mistakes, and run folders without empty log files."""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, write_scene_images
from PIL import Image

from spar.viz import side_by_side


def _widest_blank_run(title: str) -> int:
    """Widest run of blank pixel columns between the first and last inked column of ``title``
    as ``side_by_side`` draws it above a picture."""
    picture = side_by_side([Image.new("RGB", (240, 8), "white")], [title])
    strip = np.asarray(picture.convert("L"))[:-8]  # the title row, without the picture
    inked = (strip < 128).any(axis=0)
    columns = np.flatnonzero(inked)
    widest = run = 0
    for value in inked[columns[0] : columns[-1] + 1]:
        run = 0 if value else run + 1
        widest = max(widest, run)
    return widest


def test_captions_keep_the_space_between_words():
    """Pillow's 10 px default font drew "SPAR student" as "SPARstudent": the space added no
    more blank than the gaps between letters."""
    assert _widest_blank_run("SPAR student") >= _widest_blank_run("SPARstudent") + 3


def _script(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow  # a script in a fresh interpreter: about 5-6 s on 2 cores
def test_train_help_lists_only_the_groups_training_uses():
    result = _script("train.py", "--help")
    assert result.returncode == 0, result.stderr
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    backbones = "clip, clip-tiny, clip-tiny-p14, dinov3txt, maskclip, siglip2, siglip2-l16, "
    assert f"backbone: {backbones}siglip2-so400m, tiny" in groups
    assert "train_images: demo, sa1b, sa1b_extended" in groups
    assert "teacher: sliding_window" in groups
    assert "dataset" not in groups and "hydra" not in groups
    assert "trainer:" in result.stdout.split("== Config ==")[1]  # the config is still shown


@pytest.mark.slow  # a script in a fresh interpreter: about 5-6 s on 2 cores
def test_eval_without_the_dataset_is_a_short_error(tmp_path):
    run_dir = tmp_path / "run"
    result = _script(
        "eval.py", "dataset=ade20k", f"hydra.run.dir={run_dir}", "device=cpu", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert "error: ade20k: dataset root data/ADEChallengeData2016 not found" in result.stderr
    assert "dataset.root=" in result.stderr
    assert not list(run_dir.glob("*.log"))  # nothing was logged, so no (empty) log file


@pytest.mark.slow
def test_a_run_folder_holds_no_empty_log(tmp_path):
    """Hydra's file handler opens <run dir>/<script>.log only at the first record."""
    image = write_scene_images(tmp_path / "images", count=1, size=(64, 96)) / "scene_00.jpg"
    run_dir = tmp_path / "run"
    result = _script(
        "segment.py",
        f"image={image}",
        "classes=[sky,ground]",
        "templates=single",
        "bounds=[96,64]",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "scene_00_segmentation.png").is_file()
    assert not list(run_dir.glob("*.log"))


def test_a_stride_larger_than_the_window_is_a_short_error_before_any_work(tmp_path):
    """`teacher.stride=500` printed a traceback after the model was built; now a one-line
    error naming the key, the value and the window, and no run folder is left behind: neither
    the default one (outputs/train/tiny/<id>) nor the empty folders above it."""
    result = _script("train.py", "teacher.stride=500", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: teacher.stride [500, 500] is larger than teacher.window [224, 224] (the tiny "
        "backbone's native size): pixels between windows would be left uncovered; use a stride "
        "of at most the window"
    ]
    assert list(tmp_path.iterdir()) == []


def test_teacher_settings_are_checked_the_same_everywhere():
    from omegaconf import OmegaConf

    from spar.config import SettingError
    from spar.models import SlidingWindowTeacher, create_backbone
    from spar.models.teacher import check_teacher_settings

    pair = OmegaConf.create({"stride": [24, 32], "window": None})
    check_teacher_settings(pair, "maskclip")  # a ListConfig pair, as `teacher.stride=[24,32]`
    teacher = SlidingWindowTeacher(create_backbone("tiny"), stride=pair.stride)
    assert teacher.stride == (24, 32)
    for settings, message in (
        ({"stride": [600, 24]}, r"teacher.stride \[600, 24\] is larger than teacher.window"),
        ({"stride": 0}, "teacher.stride must be positive"),
        ({"stride": 24, "window": [64, 48], "batch_size": 0}, "teacher.batch_size must be"),
        (
            {"stride": 24, "window": [16, 16]},
            r"\[24, 24\] is larger than teacher.window \[16, 16\]:",
        ),
    ):
        with pytest.raises(SettingError, match=message):
            check_teacher_settings(settings, "siglip2")


def test_an_unreachable_hub_fails_at_once_naming_the_way_around(monkeypatch, tmp_path):
    """Offline without HF_HUB_OFFLINE, create_backbone("maskclip") retried for 53 s; now one
    connection attempt, then a one-line error naming a local file and the tiny backbone."""
    import socket

    from spar.models import WeightLoadingError, create_backbone

    attempts = []

    def refused(address, timeout=None):
        attempts.append((address, timeout))
        raise ConnectionRefusedError("connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(WeightLoadingError, match="huggingface.co is unreachable") as caught:
        create_backbone("maskclip")
    assert attempts == [(("huggingface.co", 443), 3.0)]
    assert "pretrained=<a local weight file>" in str(caught.value)
    assert "\n" not in str(caught.value)
