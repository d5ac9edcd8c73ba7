"""Reliability: settings checked before long work, file modes that follow the umask, orphan
temporary files, checkpoint pairs, the metrics log of resumed runs, unique and exclusive run
folders, bad images (decompression bombs, 16-bit PNGs) and evaluation kept image by image."""

import json
import os
import shutil
import stat
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import eval_config, small_run, train_config, write_benchmark, write_scene_images
from PIL import Image

from spar.config import SettingError
from spar.data.benchmarks import LabelError, SegmentationBenchmark, check_split
from spar.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    load_image,
    set_max_image_pixels,
)
from spar.distill import TeacherFeatureCache, run_distillation
from spar.distill.checkpointing import resume_training, save_training_checkpoint
from spar.distill.run_log import RunFolder, RunFolderError, RunLog
from spar.distributed import run_id
from spar.evaluation import run_evaluation
from spar.features import extract_features
from spar.io import atomic_path, atomic_save_image, atomic_write_json, remove_orphan_temporaries
from spar.models import create_backbone
from spar.models.checkpoint import read_checkpoint, save_checkpoint
from spar.models.weights import WeightLoadingError
from spar.tools.fault_trials import write_png_bomb
from spar.utils import NonFiniteError

# -- settings are checked before any long work ---------------------------------------------------


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("trainer.batch_size=0", SettingError, "trainer.batch_size must be an integer >= 1, got 0"),
        ("trainer.epochs=0", SettingError, "trainer.epochs must be an integer >= 1, got 0"),
        ("trainer.accumulate=-1", SettingError, "trainer.accumulate must be"),
        ("trainer.num_workers=-2", SettingError, "trainer.num_workers must be"),
        ("trainer.stop_after_steps=0", SettingError, "trainer.stop_after_steps must be"),
        ("trainer.grad_clip=0", SettingError, "trainer.grad_clip must be"),
        ("+trainer.batchsize=2", SettingError, "unknown setting.*trainer.batchsize"),
        ("optim.lr=0", SettingError, "optim.lr must be a number > 0, got 0"),
        ("heldout.num_images=-1", SettingError, "heldout.num_images must be"),
        ("heldout.sizes=[[160]]", SettingError, "heldout.sizes must be"),
        ("train_images.draws_per_image=0", SettingError, "train_images.draws_per_image"),
        ("max_image_pixels=0", SettingError, "max_image_pixels must be"),
        ("resume=/nonexistent/run", FileNotFoundError, "/nonexistent/run"),
    ],
)
def test_bad_settings_fail_before_the_cache_fill(tmp_path, monkeypatch, override, error, message):
    cfg = train_config(tmp_path, override)
    built = []
    monkeypatch.setattr("spar.distill.run.create_backbone", lambda *a, **k: built.append(a))
    with pytest.raises(error, match=message):
        run_distillation(cfg, tmp_path / "run")
    assert built == []  # refused before any model is built
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_an_unreadable_resume_state_is_named_before_the_fill(tmp_path):
    checkpoints = tmp_path / "old" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(WeightLoadingError, match=str(checkpoints / "last.state.pt")):
        run_distillation(train_config(tmp_path, f"resume={tmp_path / 'old'}"), tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_eval_settings_and_labels_are_checked_before_any_model(tmp_path, monkeypatch):
    root = tmp_path / "voc"
    write_benchmark("voc21", root, count=4)
    with pytest.raises(SettingError, match=r"dataset.bounds must be .*got \[128\]"):
        run_evaluation(eval_config(f"dataset.root={root}", "dataset.bounds=[128]"), tmp_path / "a")
    # The last label of the split does not fit its image: found from the headers, up front.
    last = sorted((root / "SegmentationClass").iterdir())[-1]
    Image.open(last).resize((10, 10)).save(last)
    monkeypatch.setattr("spar.evaluation.create_backbone", pytest.fail)  # never reached
    with pytest.raises(LabelError, match=f"(?s)1 problem.*{last.name}.*label size"):
        run_evaluation(eval_config(f"dataset.root={root}"), tmp_path / "b")


def test_check_split_samples_label_values(tmp_path):
    root = tmp_path / "voc"
    write_benchmark("voc21", root, count=3)
    dataset = SegmentationBenchmark("voc21", root)
    assert check_split(dataset) == []
    label = sorted((root / "SegmentationClass").iterdir())[1]
    raw = np.asarray(Image.open(label)).copy()
    raw[5, 5] = 77  # not a VOC class
    Image.fromarray(raw, mode="L").save(label)
    with pytest.raises(LabelError, match=r"label values \[77\]"):
        check_split(dataset)


# -- files follow the umask ----------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, tiny_backbone, umask, mode):
    previous = os.umask(umask)
    try:
        cache = TeacherFeatureCache(tmp_path / "cache")
        written = [cache.save("ab" * 32, torch.zeros(2, 2, 2), {})]
        written.append(save_checkpoint(tmp_path / "ckpt.safetensors", _trainable(tiny_backbone)))
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
        atomic_save_image(tmp_path / "prediction.png", Image.new("L", (4, 4)))
        log = RunLog(tmp_path / "run")
        log.write({"event": "train", "step": 1})
        log.rewind(0)  # rewritten atomically
        written += [tmp_path / "summary.json", tmp_path / "prediction.png", log.path]
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def _trainable(backbone):
    import copy

    student = copy.deepcopy(backbone).requires_grad_(False)
    student.blocks[-1].requires_grad_(True)
    return student


# -- orphan temporary files ----------------------------------------------------------------------


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_orphan_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    folder = tmp_path / "cache" / "ab"
    folder.mkdir(parents=True)
    with atomic_path(folder / "live.safetensors") as live:  # this process: alive
        host = live.name.split("~")[1]
        dead = folder / f".x.safetensors.~{host}~{_dead_pid()}~abc.tmp.safetensors"
        foreign_old = folder / ".y.safetensors.~otherhost~1~abc.tmp.safetensors"
        foreign_new = folder / ".z.safetensors.~otherhost~1~def.tmp.safetensors"
        for path in (dead, foreign_old, foreign_new):
            path.write_bytes(b"partial")
        for path, age in ((dead, 5), (foreign_old, 2 * 3600), (foreign_new, 5)):
            os.utime(path, (time.time() - age, time.time() - age))
        unrelated = folder / ".notes.tmp"
        unrelated.write_text("not ours")
        cache = TeacherFeatureCache(tmp_path / "cache")
        assert sorted(cache.removed_temporaries) == sorted([dead, foreign_old])
        assert live.exists() and foreign_new.exists() and unrelated.exists()
        assert remove_orphan_temporaries(tmp_path / "cache") == []
        live.write_bytes(b"done")
    assert (folder / "live.safetensors").read_bytes() == b"done"


# -- checkpoint pairs ----------------------------------------------------------------------------


def _state(step):
    return {
        "state": {"step": step},
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "total_steps": 10,
    }


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_a_pair_from_different_steps_is_reported_and_the_state_wins(tmp_path, tiny_backbone):
    student = _trainable(tiny_backbone)
    save_training_checkpoint(tmp_path, student, {"step": 1}, _state(1))
    old_weights = (tmp_path / "last.safetensors").read_bytes()
    with torch.no_grad():
        student.blocks[-1].ln_1.weight.add_(0.5)
    expected = _params(student)
    save_training_checkpoint(tmp_path, student, {"step": 2}, _state(2))
    # A kill between the two writes of step 2: the new state beside the old weights.
    (tmp_path / "last.safetensors").write_bytes(old_weights)
    fresh = _trainable(tiny_backbone)
    with pytest.warns(
        UserWarning, match=r"last.safetensors .*does not belong with .*last.state.pt"
    ):
        saved = resume_training(tmp_path, fresh)
    assert saved["state"]["step"] == 2
    assert all(torch.equal(expected[n], p) for n, p in _params(fresh).items())
    # The interrupted save is finished: last.safetensors holds step 2 again.
    rewritten = read_checkpoint(tmp_path / "last.safetensors")
    assert rewritten[1]["extra"]["step"] == 2
    assert all(torch.equal(expected[n], t) for n, t in rewritten[0].items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resume_training(tmp_path, _trainable(tiny_backbone))  # a sound pair now: no warning


def test_a_kill_before_the_best_write_is_finished_on_resume(tmp_path, tiny_backbone):
    student = _trainable(tiny_backbone)
    save_training_checkpoint(tmp_path, student, {"step": 1}, _state(1), best=True)
    old_best = (tmp_path / "best.safetensors").read_bytes()
    with torch.no_grad():
        student.blocks[-1].ln_1.weight.add_(0.5)
    save_training_checkpoint(tmp_path, student, {"step": 2}, _state(2), best=True)
    (tmp_path / "best.safetensors").write_bytes(old_best)  # killed before the best write
    with pytest.warns(UserWarning, match="best.safetensors"):
        resume_training(tmp_path, _trainable(tiny_backbone))
    assert read_checkpoint(tmp_path / "best.safetensors")[1]["extra"]["step"] == 2


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_weights_file_resumes_from_the_state(
    tmp_path, tiny_backbone, damage
):
    student = _trainable(tiny_backbone)
    save_training_checkpoint(tmp_path, student, {"step": 3}, _state(3))
    weights = tmp_path / "last.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    with pytest.warns(UserWarning, match=str(weights)):
        assert resume_training(tmp_path, _trainable(tiny_backbone))["state"]["step"] == 3


@pytest.mark.parametrize("cut", [0, 3, 200, -1])
def test_a_truncated_state_is_an_error_naming_it(tmp_path, tiny_backbone, cut):
    save_training_checkpoint(tmp_path, _trainable(tiny_backbone), {"step": 1}, _state(1))
    state = tmp_path / "last.state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: cut if cut >= 0 else len(data) - 1])
    with pytest.raises(WeightLoadingError, match=str(state)):
        resume_training(tmp_path, _trainable(tiny_backbone))


def test_non_finite_parameters_leave_the_previous_pair_untouched(tmp_path, tiny_backbone):
    student = _trainable(tiny_backbone)
    save_training_checkpoint(tmp_path, student, {"step": 1}, _state(1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        student.blocks[-1].ln_1.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match="resblocks.3.ln_1.weight"):
        save_training_checkpoint(tmp_path, student, {"step": 2}, _state(2))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -- the metrics log and run folders -------------------------------------------------------------


def test_run_log_rewinds_to_a_checkpoint_and_drops_a_cut_line(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 6):
        log.write({"event": "train", "step": step})
    with log.path.open("a") as file:
        file.write('{"event": "train", "st')  # a kill in the middle of a write
    log = RunLog(tmp_path)
    assert log.records == 5
    log.rewind(3)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    log.write({"event": "train", "step": 4})
    assert log.records == 4 and len(log.path.read_text().splitlines()) == 4


def test_run_folders_are_unique_and_written_by_one_process(tmp_path):
    names = {run_id() for _ in range(50)}
    assert len(names) == 50  # same second, different folders
    first = RunFolder(tmp_path / "run")
    with pytest.raises(RunFolderError, match="in use by another process"):
        RunFolder(tmp_path / "run")
    first.release()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match=r"already holds a run .*resume="):
        RunFolder(tmp_path / "run")
    RunFolder(tmp_path / "run", resume=tmp_path / "run" / "checkpoints").release()


@pytest.mark.slow
def test_a_resumed_run_writes_each_record_once(tmp_path):
    images = write_scene_images(tmp_path / "images", count=4)
    common = ("trainer.epochs=2", "trainer.checkpoint_every=1")
    full, full_dir = small_run(tmp_path, "full", *common, images=images)
    part, part_dir = small_run(
        tmp_path, "part", *common, "trainer.stop_after_steps=4", images=images
    )
    # What a run killed after step 6 leaves: records past its last checkpoint (step 4).
    with (part_dir / "metrics.jsonl").open("a") as file:
        for step in (5, 6):
            file.write(json.dumps({"event": "train", "step": step, "loss": 1.0}) + "\n")
    with pytest.raises(RunFolderError, match="already holds a run"):
        small_run(tmp_path, "part", *common, images=images)
    resumed, _ = small_run(tmp_path, "part", *common, f"resume={part_dir}", images=images)
    records = [json.loads(line) for line in (part_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [(r["event"], r["step"]) for r in expected]
    assert [r.get("loss") for r in records] == [r.get("loss") for r in expected]
    assert resumed["steps"] == full["steps"]


# -- bad images ----------------------------------------------------------------------------------


def test_sixteen_bit_pngs_are_scaled_not_white(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    loaded = load_image(tmp_path / "grey16.png")
    assert loaded.shape == (3, 20, 30) and loaded.dtype == torch.float32
    expected = torch.from_numpy(values.astype(np.float32) / 65535)
    assert torch.equal(loaded[0], expected) and torch.equal(loaded[2], expected)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_images_above_the_limit_are_refused_before_decoding(tmp_path, bomb):
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        load_image(bomb)  # 14000x14000: Pillow's own bomb check, named
    Image.new("RGB", (300, 200)).save(tmp_path / "large.jpg")
    try:
        set_max_image_pixels(300 * 200 - 1)
        with pytest.raises(ImageTooLargeError, match=r"300x200 = 60000 pixels.*max_image_pixels"):
            load_image(tmp_path / "large.jpg")
        set_max_image_pixels(300 * 200)
        assert load_image(tmp_path / "large.jpg").shape == (3, 200, 300)
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    with pytest.raises(ValueError, match="max_image_pixels"):
        set_max_image_pixels(0)


def test_a_bomb_is_skipped_and_counted_by_training_and_extract_features(tmp_path, bomb):
    images = write_scene_images(tmp_path / "images", count=4)
    shutil.copyfile(bomb, images / "aa_bomb.png")  # sorts first: a training image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary, _ = small_run(
            tmp_path, "run", "trainer.epochs=1", "teacher.cache=false", images=images
        )
        backbone = create_backbone("tiny")
        counts = extract_features(
            backbone,
            sorted(images.iterdir()),
            images,
            tmp_path / "features",
            mean=backbone.mean,
            std=backbone.std,
            bounds=(128, 96),
            show_progress=False,
        )
    assert summary["skipped_files"] == [str(images / "aa_bomb.png")] and summary["steps"] > 0
    assert counts["skipped_files"] == [str(images / "aa_bomb.png")] and counts["written"] == 4


# -- evaluation keeps every image scored ---------------------------------------------------------


def test_eval_writes_per_image_scores_and_resumes_after_a_crash(tmp_path, monkeypatch):
    root = tmp_path / "voc"
    write_benchmark("voc21", root, count=4)
    cfg = eval_config(f"dataset.root={root}")
    complete = run_evaluation(cfg, tmp_path / "complete")
    lines = (tmp_path / "complete" / "per_image.jsonl").read_text().splitlines()
    assert len(lines) == 5 and "fingerprint" in json.loads(lines[0])
    assert sum(json.loads(line)["pixels"] for line in lines[1:]) > 0

    from spar.segmentation import OpenVocabSegmenter

    predict, calls = OpenVocabSegmenter.predict, []

    def crashing_predict(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return predict(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(OpenVocabSegmenter, "predict", crashing_predict)
        with pytest.raises(RuntimeError, match="out of memory"):
            run_evaluation(cfg, tmp_path / "crashed")
    kept = (tmp_path / "crashed" / "per_image.jsonl").read_text().splitlines()
    assert len(kept) == 3  # the fingerprint and the two images scored before the crash
    resumed = run_evaluation(cfg, tmp_path / "crashed")
    assert resumed["resumed_images"] == 2 and resumed["num_images"] == 4
    assert resumed["miou"] == complete["miou"]
    assert resumed["per_class_iou"] == complete["per_class_iou"]
    with pytest.raises(ValueError, match="other settings"):
        run_evaluation(
            eval_config(f"dataset.root={root}", "templates=imagenet80"), tmp_path / "crashed"
        )


def test_per_image_scores_survive_two_crashes_in_a_row(tmp_path):
    """A line cut short by a crash is dropped when the scores are read back, so the resumed
    run's appends (and a later resume after a second crash) read cleanly."""
    from spar.distributed import DistributedContext
    from spar.evaluation import PerImageResults

    context = DistributedContext()
    first = PerImageResults(tmp_path, {"dataset": "voc21"}, context)
    first.write({"image": "a", "skipped": "test"})
    with first.path.open("a", encoding="utf-8") as file:
        file.write('{"image": "b", "pix')  # killed mid-line
    second = PerImageResults(tmp_path, {"dataset": "voc21"}, context)
    assert set(second.done) == {"a"}
    second.write({"image": "b", "skipped": "test"})
    third = PerImageResults(tmp_path, {"dataset": "voc21"}, context)
    assert set(third.done) == {"a", "b"}
    lines = first.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    with first.path.open("a", encoding="utf-8") as file:
        file.write("not json\n")
    with pytest.raises(ValueError, match="line 4 is not JSON"):
        PerImageResults(tmp_path, {"dataset": "voc21"}, context)
