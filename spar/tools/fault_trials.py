"""Fault trials: kill, corrupt and feed bad images to short training runs, then check that nothing
came out silently wrong or silently lost.

Every trial runs the real library (``spar.distill.run_distillation`` on the tiny backbone and a
few generated images) in a forked child process, so that a kill is a real ``SIGKILL`` of the
process doing the work, and compares what it leaves with an uninterrupted reference run:

- **kill during caching / training / between the two checkpoint writes**: the child sends itself
  ``SIGKILL`` at the k-th teacher-cache write (before it, half-way through the temporary file,
  or after the rename), at the k-th training step (before or after it), or after the k-th
  ``last.state.pt`` write and before its ``last.safetensors``; k is drawn from the events of the
  reference run. Then the run is resumed as a user would (``resume=<run folder>`` when it holds a
  checkpoint, else a fresh run) and must end with trained parameters bitwise equal to the
  reference, the same ``metrics.jsonl`` records (no record lost or repeated; timings aside), a
  cache bitwise equal to the reference's and no temporary file left.
- **flipped data bytes, a flipped header byte, a truncated cache entry**: a random training
  entry of a filled cache is damaged; the next run must warn naming the file and end bitwise equal
  to the reference.
- **mismatched checkpoint pair, truncated last.safetensors**: a run stopped at a random step gets
  the reference's final ``last.safetensors`` (another step) or a truncated one; the resume must
  warn naming it and end bitwise equal to the reference.
- **truncated last.state.pt**: the resume must fail at once with an error naming the file
  (the state cannot be recovered), before any work and without touching the run folder.
- **decompression bomb**: a 14000x14000 PNG (or, with a small ``max_image_pixels``, an image
  above it) among the training images: training (cached or online teacher) and
  ``extract_features`` must finish, skipping and counting it.
- **16-bit PNG**: a random 16-bit grey PNG must load as its values / 65535.

Then (``guarantees=true``) one trial per class of guarantee of the issue-22 work
(:mod:`spar.tools.fault_trials_guarantees`): refused or recorded changes on resume, held-out
overlap, unwritable folders, evaluation and feature reuse, collision-free names, result rows, the
page's model cache, atomic ``save_pretrained``, bounded and finite loading, early errors on class
files and images, no hub look-up of a local path. Each is ``held``, ``broken`` or ``pending``.

Trials are drawn from one seed, so a run of :func:`run_trials` is reproducible. The parent
process only forks, reads files and compares arrays (no torch computation, which keeps forking
safe).

As a command: ``python -m spar.tools.fault_trials [kills=5 per_kind=1 guarantees=false]``
(``scripts/fault_trials.py``; config ``spar/configs/fault_trials.yaml``) prints a line per trial
and the tables, writes ``fault_trials.json`` to the run folder and exits with status 1 when a
trial lost anything or a guarantee trial found its guarantee broken.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.numpy import load_file

from ..config import report_user_errors
from ..configs import CONFIG_DIR
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..distributed import register_run_id_resolver

KILL_KINDS = ("kill during caching", "kill during training", "kill between checkpoint writes")
CORRUPTION_KINDS = (
    "cache: flipped data bytes",
    "cache: flipped header byte",
    "cache: truncated entry",
    "checkpoint: mismatched pair",
    "checkpoint: truncated weights",
    "checkpoint: truncated state",
)
IMAGE_KINDS = ("image: decompression bomb", "image: 16-bit PNG")
KINDS = KILL_KINDS + CORRUPTION_KINDS + IMAGE_KINDS
FIXED_MTIME = 1_700_000_000
CHILD_TIMEOUT_S = 600
# A run of seconds: 2 training images x 2 views, 1 held-out image, 2 epochs (8 steps), a record
# every step and a checkpoint every 3 steps and at epoch ends, so that a kill can leave records
# past the last checkpoint.
TRIAL_SETTINGS = (
    "train_images.augment.bounds=[128,96]",
    "train_images.augment.min_crop=48",
    "train_images.augment.min_short_side=48",
    "train_images.draws_per_image=2",
    "heldout.num_images=1",
    "heldout.sizes=[[128,96]]",
    "teacher.window=64",
    "teacher.stride=32",
    "trainer.epochs=2",
    "trainer.checkpoint_every=3",
    "trainer.log_every=1",
    "trainer.num_workers=0",
    "trainer.show_progress=false",
    "optim.lr=1e-3",
    "device=cpu",
)


# -- the trial data --------------------------------------------------------------------------


def write_trial_images(folder: Path, count: int = 3, size: tuple[int, int] = (96, 128)) -> Path:
    """``count`` seeded random-blob PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    height, width = size
    for index in range(count):
        coarse = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        path = folder / f"image_{index:02d}.png"
        image.save(path)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))  # part of the cache keys: same keys every run
    return folder


def write_png_bomb(path: Path, width: int = 14000, height: int = 14000) -> Path:
    """A valid 8-bit grey PNG of ``width`` x ``height`` zeros (a few hundred KB on disk that
    decode to ``width * height`` bytes): a decompression bomb.

    Written chunk by chunk because Pillow would need the whole image in memory to save it.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with path.open("wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        file.write(chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def trial_config(images: Path, cache: Path, *overrides: str) -> dict[str, Any]:
    """The ``configs/train.yaml`` config of a trial run, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_run_id_resolver()
    settings = [*TRIAL_SETTINGS, f"train_images.root={images}", f"teacher.cache_dir={cache}"]
    settings += list(overrides)
    if GlobalHydra.instance().is_initialized():  # under the fault-trials command: the same configs
        cfg = compose(config_name="train", overrides=settings)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=settings)
    return OmegaConf.to_container(cfg, resolve=True)


# -- running the library in a child ----------------------------------------------------------


def in_child(work: Callable[[], Any]) -> dict[str, Any]:
    """Run ``work()`` in a forked child; returns ``{"status": "ok", "result": ...}``,
    ``{"status": "error", "error": ...}`` or ``{"status": "killed"}`` (SIGKILL)."""
    handle, report = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = work()
            payload = {
                "status": "ok",
                "result": result,
                "warnings": [str(w.message) for w in caught],
            }
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            payload = {
                "status": "error",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
            code = 1
        Path(report).write_text(json.dumps(payload, default=str))
        os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # a hung child is a failed trial, not a hung script
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            Path(report).unlink(missing_ok=True)
            return {"status": "error", "error": f"timed out after {CHILD_TIMEOUT_S} s"}
        time.sleep(0.05)
    try:
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return {"status": "killed"}
        return json.loads(Path(report).read_text() or '{"status": "error", "error": "no report"}')
    finally:
        Path(report).unlink(missing_ok=True)


def _train(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from ..distill import run_distillation

    summary = run_distillation(config, out_dir)
    return {
        k: summary[k] for k in ("steps", "skipped_images", "skipped_files", "cache") if k in summary
    }


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counting_hooks(counts: Counter) -> None:
    """Count the events a kill can hit (cache writes, training steps, checkpoint saves)."""
    from ..distill import cache as cache_module
    from ..distill import checkpointing, trainer

    save_file, train_step = cache_module.save_file, trainer.Distiller.train_step
    save_checkpoint = checkpointing.save_checkpoint

    def counted_save_file(*args, **kwargs):
        counts["cache"] += 1
        return save_file(*args, **kwargs)

    def counted_step(self, *args, **kwargs):
        counts["training"] += 1
        return train_step(self, *args, **kwargs)

    def counted_checkpoint(path, *args, **kwargs):
        if Path(path).name == "last.safetensors":
            counts["checkpoint"] += 1
        return save_checkpoint(path, *args, **kwargs)

    cache_module.save_file = counted_save_file
    trainer.Distiller.train_step = counted_step
    checkpointing.save_checkpoint = counted_checkpoint


def _killing_hooks(kind: str, at: int, stage: str) -> None:
    """SIGKILL this process at event ``at`` (1-based) of ``kind`` at ``stage``."""
    from ..distill import cache as cache_module
    from ..distill import checkpointing, trainer

    seen = Counter()
    if kind == "cache":
        save_file = cache_module.save_file

        def killing_save_file(tensors, filename, metadata=None):
            seen["cache"] += 1
            if seen["cache"] == at and stage == "before":
                _kill_self()
            if seen["cache"] == at and stage == "mid-write":
                save_file(tensors, filename, metadata=metadata)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                _kill_self()
            save_file(tensors, filename, metadata=metadata)

        cache_module.save_file = killing_save_file
        if stage == "after-rename":
            save = cache_module.TeacherFeatureCache.save

            def killing_save(self, *args, **kwargs):
                path = save(self, *args, **kwargs)
                if seen["cache"] == at:
                    _kill_self()
                return path

            cache_module.TeacherFeatureCache.save = killing_save
    elif kind == "training":
        train_step = trainer.Distiller.train_step

        def killing_step(self, *args, **kwargs):
            seen["training"] += 1
            if seen["training"] == at and stage == "before":
                _kill_self()
            result = train_step(self, *args, **kwargs)
            if seen["training"] == at:
                _kill_self()
            return result

        trainer.Distiller.train_step = killing_step
    else:
        save_checkpoint = checkpointing.save_checkpoint

        def killing_checkpoint(path, *args, **kwargs):
            if Path(path).name == "last.safetensors":
                seen["checkpoint"] += 1
                if seen["checkpoint"] == at:  # last.state.pt is written, this one not yet
                    _kill_self()
            return save_checkpoint(path, *args, **kwargs)

        checkpointing.save_checkpoint = killing_checkpoint


# -- comparing with the reference ------------------------------------------------------------


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def _same_tensors(a: Path, b: Path) -> bool:
    first, second = _tensors(a), _tensors(b)
    return first.keys() == second.keys() and all(
        first[k].dtype == second[k].dtype and np.array_equal(first[k], second[k]) for k in first
    )


def _records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records without their timings."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]


def _same_records(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> bool:
    """Training records equal bitwise; held-out records equal but for the scores, which may
    differ in the last bits (rel. 1e-6): the held-out cosine of a process that computed the
    held-out teacher maps and of one that read them from the cache differ by an ulp, with
    bitwise equal inputs (seen on CPU; the trained parameters are bitwise equal)."""
    if len(records) != len(reference):
        return False
    for record, expected in zip(records, reference, strict=True):
        if record.get("event") != "heldout":
            if record != expected:
                return False
            continue
        if record.keys() != expected.keys():
            return False
        for key, value in record.items():
            if isinstance(value, dict):
                same = value.keys() == expected[key].keys() and all(
                    np.isclose(value[k], expected[key][k], rtol=1e-6, atol=0) for k in value
                )
            else:
                same = value == expected[key]
            if not same:
                return False
    return True


def _cache_entries(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in cache.rglob("*.safetensors") if not p.name.startswith(".")}


def _temporaries(folder: Path) -> list[Path]:
    from ..io import is_temporary

    return [p for p in folder.rglob(".*") if is_temporary(p)]


def _compare(run: Path, cache: Path, reference: dict[str, Path]) -> list[str]:
    """What differs from the reference (empty: nothing)."""
    problems = []
    weights = run / "checkpoints" / "last.safetensors"
    if not weights.is_file() or not _same_tensors(
        weights, reference["run"] / weights.relative_to(run)
    ):
        problems.append("trained parameters differ from the reference")
    if not _same_records(_records(run), _records(reference["run"])):
        problems.append("metrics.jsonl records differ from the reference")
    entries, expected = _cache_entries(cache), _cache_entries(reference["cache"])
    if entries.keys() != expected.keys():
        problems.append(f"cache holds {len(entries)} entries, the reference {len(expected)}")
    elif not all(_same_tensors(entries[name], expected[name]) for name in entries):
        problems.append("cache entries differ from the reference")
    left = _temporaries(cache) + _temporaries(run)
    if left:
        problems.append(f"temporary files left: {[p.name for p in left]}")
    return problems


# -- the trials ------------------------------------------------------------------------------


class TrialRunner:
    """Draws and runs the trials in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, seed: int = 0) -> None:
        self.workdir = Path(workdir)
        self.rng = random.Random(seed)
        self.images = write_trial_images(self.workdir / "images")
        self.reference = {
            "run": self.workdir / "reference",
            "cache": self.workdir / "reference-cache",
        }
        self.counts: Counter = Counter()
        self._serial = 0

    def _fresh(self, name: str) -> Path:
        self._serial += 1
        return self.workdir / f"{self._serial:03d}-{name}"

    def prepare_reference(self) -> None:
        """The uninterrupted run, counting the events a kill can hit."""
        config = trial_config(self.images, self.reference["cache"])

        def work():
            counts = Counter()
            _counting_hooks(counts)
            _train(config, self.reference["run"])
            return dict(counts)

        outcome = in_child(work)
        if outcome["status"] != "ok":
            raise RuntimeError(f"the reference run failed: {outcome.get('traceback', outcome)}")
        self.counts = Counter(outcome["result"])

    # kills -------------------------------------------------------------------------------------

    def kill_trial(self, kind: str) -> tuple[bool, str]:
        event = {"kill during caching": "cache", "kill during training": "training"}.get(
            kind, "checkpoint"
        )
        at = self.rng.randint(1, self.counts[event])
        stage = {
            "cache": self.rng.choice(["before", "mid-write", "after-rename"]),
            "training": self.rng.choice(["before", "after"]),
            "checkpoint": "between",
        }[event]
        folder = self._fresh(f"kill-{event}")
        run, cache = folder / "run", folder / "cache"
        if event != "cache":  # a filled cache: the kill lands in training
            shutil.copytree(self.reference["cache"], cache)
        config = trial_config(self.images, cache)

        def killed():
            _killing_hooks(event, at, stage)
            return _train(config, run)

        outcome = in_child(killed)
        what = f"{event} event {at} ({stage})"
        if outcome["status"] != "killed":
            return False, f"{what}: the run was not killed ({outcome['status']})"
        resumable = (run / "checkpoints" / "last.state.pt").is_file()
        final = run if resumable else folder / "rerun"
        resumed = trial_config(self.images, cache, f"resume={run}" if resumable else "resume=null")
        outcome = in_child(lambda: _train(resumed, final))
        if outcome["status"] != "ok":
            return False, f"{what}: the resumed run failed: {outcome.get('error')}"
        problems = _compare(final, cache, self.reference)
        return not problems, f"{what}: " + ("; ".join(problems) or "identical")

    # corruption --------------------------------------------------------------------------------

    def cache_trial(self, kind: str) -> tuple[bool, str]:
        folder = self._fresh("cache")
        cache = folder / "cache"
        shutil.copytree(self.reference["cache"], cache)
        entries = sorted(p for p in _cache_entries(cache).values() if "augmentation" in _view(p))
        entry = self.rng.choice(entries)
        data = bytearray(entry.read_bytes())
        header_end = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        if kind == "cache: flipped data bytes":
            for position in self.rng.sample(range(header_end, len(data)), 64):
                data[position] ^= self.rng.randint(1, 255)
        elif kind == "cache: flipped header byte":
            data[self.rng.randrange(header_end)] ^= self.rng.randint(1, 255)
        else:
            data = data[: self.rng.randrange(len(data))]
        original = entry.read_bytes()
        entry.write_bytes(bytes(data))
        # A flip of header padding into other whitespace leaves the entry's content as it was.
        intact = _same_entry(entry, original)
        config = trial_config(self.images, cache)
        outcome = in_child(lambda: _train(config, folder / "run"))
        if outcome["status"] != "ok":
            return False, f"{entry.name}: the run failed: {outcome.get('error')}"
        warned = any(entry.name in message for message in outcome["warnings"])
        problems = _compare(folder / "run", cache, self.reference)
        if not warned and not intact:
            problems.append("no warning named the damaged entry")
        return not problems, f"{entry.name}: " + ("; ".join(problems) or "reported, recomputed")

    def checkpoint_trial(self, kind: str) -> tuple[bool, str]:
        folder = self._fresh("checkpoint")
        run, cache = folder / "run", folder / "cache"
        shutil.copytree(self.reference["cache"], cache)
        stop = self.rng.randint(1, self.counts["training"] - 1)
        config = trial_config(self.images, cache, f"trainer.stop_after_steps={stop}")
        outcome = in_child(lambda: _train(config, run))
        if outcome["status"] != "ok":
            return False, f"the stopped run failed: {outcome.get('error')}"
        weights, state = (
            run / "checkpoints" / "last.safetensors",
            run / "checkpoints" / "last.state.pt",
        )
        if kind == "checkpoint: mismatched pair":
            shutil.copyfile(self.reference["run"] / "checkpoints" / "last.safetensors", weights)
            damaged = weights
        else:
            damaged = weights if kind == "checkpoint: truncated weights" else state
            data = damaged.read_bytes()
            damaged.write_bytes(data[: self.rng.randrange(len(data))])
        before = sorted(p.name for p in run.rglob("*"))
        metrics = (run / "metrics.jsonl").read_bytes()
        resumed = trial_config(self.images, cache, f"resume={run}")
        outcome = in_child(lambda: _train(resumed, run))
        what = f"stopped at step {stop}, {damaged.name}"
        if damaged is state:  # the state is gone: a clear error, before any work, is the outcome
            named = outcome["status"] == "error" and str(state) in outcome["error"]
            untouched = (
                sorted(p.name for p in run.rglob("*")) == before
                and (run / "metrics.jsonl").read_bytes() == metrics
            )
            ok = named and untouched
            return ok, f"{what}: " + ("error names the file" if ok else str(outcome))
        if outcome["status"] != "ok":
            return False, f"{what}: the resumed run failed: {outcome.get('error')}"
        problems = _compare(run, cache, self.reference)
        if not any(str(weights) in message for message in outcome["warnings"]):
            problems.append("no warning named the weights file")
        return not problems, f"{what}: " + ("; ".join(problems) or "reported, identical")

    # bad images --------------------------------------------------------------------------------

    def bomb_trial(self) -> tuple[bool, str]:
        folder = self._fresh("bomb")
        images = folder / "images"
        shutil.copytree(self.images, images)
        small_limit = self.rng.random() < 0.5
        if small_limit:  # a configured limit: an ordinary image above it
            side = self.rng.randint(200, 400)
            Image.new("RGB", (side, side), (90, 120, 30)).save(images / "aa_large.jpg")
            bad, limit = images / "aa_large.jpg", 150 * 150
        else:  # Pillow's decompression-bomb size, under the default limit
            bad, limit = write_png_bomb(images / "aa_bomb.png"), DEFAULT_MAX_IMAGE_PIXELS
        cached = self.rng.random() < 0.5
        config = trial_config(
            images,
            folder / "cache",
            f"teacher.cache={str(cached).lower()}",
            *([f"max_image_pixels={limit}"] if small_limit else []),
        )

        def work():
            summary = _train(config, folder / "run")
            return {"train": summary, "features": _extract(images, folder / "features", limit)}

        outcome = in_child(work)
        what = f"{bad.name} ({'cached' if cached else 'online'} teacher, limit {limit})"
        if outcome["status"] != "ok":
            return False, f"{what}: {outcome.get('error')}"
        train, features = outcome["result"]["train"], outcome["result"]["features"]
        ok = (
            str(bad) in train["skipped_files"]
            and train["steps"] > 0
            and features["skipped_files"] == [str(bad)]
        )
        return ok, f"{what}: skipped and counted" if ok else f"{what}: {outcome['result']}"

    def sixteen_bit_trial(self) -> tuple[bool, str]:
        folder = self._fresh("16bit")
        folder.mkdir(parents=True)
        height, width = self.rng.randint(16, 64), self.rng.randint(16, 64)
        values = np.random.default_rng(self.rng.randrange(2**32)).integers(
            0, 65536, (height, width), dtype=np.uint16
        )
        path = folder / "grey16.png"
        Image.fromarray(values).save(path)
        outcome = in_child(lambda: _load(path))
        if outcome["status"] != "ok":
            return False, f"{path.name}: {outcome.get('error')}"
        loaded = np.asarray(outcome["result"], dtype=np.float32)
        expected = values.astype(np.float32) / 65535.0
        ok = loaded.shape == (3, height, width) and np.allclose(loaded, expected[None], atol=1e-6)
        return ok, f"{path.name} {height}x{width}: " + ("exact" if ok else "wrong values")


def _same_entry(path: Path, original: bytes) -> bool:
    """Whether the (damaged) file ``path`` still reads as the entry ``original`` held."""
    from safetensors.numpy import load

    try:
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as copy:
            copy.write(original)
            copy.flush()
            same_metadata = _metadata(path) == _metadata(Path(copy.name))
        damaged, intact = load_file(str(path)), load(original)
    except Exception:  # noqa: BLE001 - unreadable: not intact
        return False
    return (
        same_metadata
        and damaged.keys() == intact.keys()
        and all(np.array_equal(damaged[k], intact[k]) for k in damaged)
    )


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as file:
        return file.metadata() or {}


def _view(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as file:
        return json.loads(file.metadata()["description"])["view"]


def _load(path: Path) -> list:
    from ..data.images import load_image

    return load_image(path).tolist()


def _extract(images: Path, out_dir: Path, limit: int) -> dict[str, Any]:
    from ..data.images import list_images, set_max_image_pixels
    from ..features import extract_features
    from ..models import create_backbone

    set_max_image_pixels(limit)
    backbone = create_backbone("tiny")
    counts = extract_features(
        backbone,
        list_images(images),
        images,
        out_dir,
        mean=backbone.mean,
        std=backbone.std,
        bounds=(128, 96),
        show_progress=False,
    )
    return {"written": counts["written"], "skipped_files": counts["skipped_files"]}


def draw_trials(kills: int, per_kind: int, seed: int) -> list[str]:
    """The trial kinds in order: ``kills`` kill points spread over :data:`KILL_KINDS`, then
    ``per_kind`` trials of every corruption and image kind."""
    kinds = [KILL_KINDS[i % len(KILL_KINDS)] for i in range(kills)]
    return kinds + [kind for kind in CORRUPTION_KINDS + IMAGE_KINDS for _ in range(per_kind)]


def run_trials(
    workdir: str | Path | None = None,
    *,
    kills: int = 20,
    per_kind: int = 3,
    seed: int = 0,
    keep: bool = False,
    guarantees: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the fault trials; returns ``{"seed", "rows": [{kind, trials, survived, lost}],
    "trials": [{kind, survived, detail}]}``.

    Args:
        workdir: where the runs go (default: a temporary folder, removed unless ``keep``).
        kills: kill points, spread over the three kill kinds.
        per_kind: trials of each corruption and bad-image kind.
        seed: draws every trial (kill points, bytes flipped, cuts, image sizes).
        guarantees: also run the guarantee trials
            (:func:`~spar.tools.fault_trials_guarantees.run_guarantee_trials`), returned under
            ``"guarantees"``.
        progress: called with one line per finished trial.
    """
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="spar-fault-trials-") if temporary else workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        runner = TrialRunner(workdir, seed)
        runner.prepare_reference()
        trials = []
        for kind in draw_trials(kills, per_kind, seed):
            if kind in KILL_KINDS:
                survived, detail = runner.kill_trial(kind)
            elif kind.startswith("cache:"):
                survived, detail = runner.cache_trial(kind)
            elif kind.startswith("checkpoint:"):
                survived, detail = runner.checkpoint_trial(kind)
            elif kind == "image: decompression bomb":
                survived, detail = runner.bomb_trial()
            else:
                survived, detail = runner.sixteen_bit_trial()
            trials.append({"kind": kind, "survived": survived, "detail": detail})
            if progress is not None:
                progress(f"{'survived' if survived else 'LOST'}  {kind}: {detail}")
        checked = []
        if guarantees:
            from .fault_trials_guarantees import run_guarantee_trials

            checked = run_guarantee_trials(workdir, seed, progress=progress)
    finally:
        if temporary and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for kind in KINDS:
        done = [t for t in trials if t["kind"] == kind]
        if done:
            survived = sum(t["survived"] for t in done)
            rows.append(
                {
                    "kind": kind,
                    "trials": len(done),
                    "survived": survived,
                    "lost": len(done) - survived,
                }
            )
    return {
        "seed": seed,
        "kills": kills,
        "per_kind": per_kind,
        "rows": rows,
        "trials": trials,
        "guarantees": checked,
    }


def format_table(results: dict[str, Any]) -> str:
    """The trial table: kind, trials, survived, lost (markdown)."""
    lines = ["| trial kind | trials | survived | lost |", "|---|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['kind']} | {row['trials']} | {row['survived']} | {row['lost']} |")
    total = {k: sum(r[k] for r in results["rows"]) for k in ("trials", "survived", "lost")}
    lines.append(f"| **all** | {total['trials']} | {total['survived']} | {total['lost']} |")
    return "\n".join(lines)


def run_fault_trials(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """What the command (:func:`main`) runs (``configs/fault_trials.yaml``: ``kills``,
    ``per_kind``, ``seed``, ``workdir``, ``keep``, ``guarantees``): the trials, a line per trial
    and the tables printed, and ``out_dir/fault_trials.json`` written."""
    from ..config import require_bool, require_int
    from ..io import atomic_write_json

    require_int("kills", cfg["kills"], 0)
    require_int("per_kind", cfg["per_kind"], 0)
    require_int("seed", cfg["seed"], 0)
    require_bool("keep", cfg["keep"])
    require_bool("guarantees", cfg.get("guarantees", True))
    start = time.perf_counter()
    results = run_trials(
        cfg["workdir"],
        kills=cfg["kills"],
        per_kind=cfg["per_kind"],
        seed=cfg["seed"],
        keep=cfg["keep"],
        guarantees=cfg.get("guarantees", True),
        progress=lambda line: print(line, flush=True),
    )
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(results))
    if results["guarantees"]:
        from .fault_trials_guarantees import format_guarantees

        print(format_guarantees(results["guarantees"]))
    print(f"fault trials took {results['seconds']} s")
    atomic_write_json(Path(out_dir) / "fault_trials.json", results)
    print(f"results in {Path(out_dir) / 'fault_trials.json'}")
    return results


register_run_id_resolver()  # ${spar_run_id:} in the run folder, resolved before main() runs


@hydra.main(config_path="pkg://spar.configs", config_name="fault_trials", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """The command line (Hydra overrides): the trials; exit status 1 when one lost anything."""
    results = run_fault_trials(OmegaConf.to_container(cfg), HydraConfig.get().runtime.output_dir)
    broken = any(trial["status"] == "broken" for trial in results["guarantees"])
    if broken or any(row["lost"] for row in results["rows"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
