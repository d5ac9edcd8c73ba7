"""Training end to end on the tiny backbone: agreement improves, resume continues the same
trajectory, checkpoints load through create_backbone, bad input is handled; configs compose."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import CONFIGS, ROOT, small_run, train_config, write_scene_images
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from safetensors import safe_open

from spar.config import RenamedSettingError, reject_renamed_overrides
from spar.distill import (
    AugmentationRecipe,
    DistillationViews,
    Distiller,
    OptimSettings,
    SizeBucketBatchSampler,
    StudentOptimizer,
    TeacherFeatureCache,
    TrainerSettings,
    bucket_batches,
    epoch_order,
    learning_rate_factor,
    prepare,
    resolve_resume_paths,
    run_distillation,
)
from spar.distill.buckets import image_size_or_none
from spar.distributed import register_run_id_resolver
from spar.models import SlidingWindowTeacher, WeightLoadingError, create_backbone
from spar.models.checkpoint import read_checkpoint, save_checkpoint
from spar.utils import NonFiniteError

register_run_id_resolver()


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def test_demo_preset_distils_and_heldout_error_drops(tmp_path):
    cfg = train_config(tmp_path, "trainer.epochs=4")
    summary = run_distillation(cfg, tmp_path / "run")
    assert summary["heldout_mse_after"] < 0.75 * summary["heldout_mse_before"]
    assert summary["heldout_cos_after"] > summary["heldout_cos_before"]
    off_range = summary["heldout_sizes"]["768x576"]
    assert off_range["mse_after"] < off_range["mse_before"]
    written = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    for key in (
        "heldout_mse_before",
        "heldout_mse_after",
        "heldout_cos_before",
        "heldout_cos_after",
        "steps",
        "images_seen",
        "checkpoint",
    ):
        assert written[key] is not None, key
    assert written["steps"] == 4 * 32 and written["images_seen"] == 4 * 32
    assert written["skipped_images"] == 0
    # the default teacher is the cached one: 4 images x 8 fixed views filled first
    assert written["cache"] == {"computed": 32, "reused": 0, "skipped": 0}
    assert written == json.loads(json.dumps(summary))  # one writer, with every field
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()


def test_checkpoint_loads_through_create_backbone(tmp_path):
    summary, run_dir = small_run(tmp_path, "run", "trainer.epochs=1", "optim.lr=1e-3")
    checkpoint = summary["checkpoint"]
    tensors, metadata = read_checkpoint(checkpoint)
    assert metadata["backbone"]["name"] == "tiny"
    assert metadata["extra"]["run"]["teacher"]["stride"] == 24
    pretrained = create_backbone("tiny", trainable_blocks="last-2")
    distilled = create_backbone("tiny", checkpoint=checkpoint)
    # Only the two trainable blocks are stored, and they differ from the pretrained ones.
    assert all(".resblocks.2." in k or ".resblocks.3." in k for k in tensors)
    assert len(tensors) == sum(1 for p in pretrained.parameters() if p.requires_grad)
    state = distilled.state_dict()
    for key, value in tensors.items():
        torch.testing.assert_close(state[key], value)
    assert any(not torch.equal(pretrained.state_dict()[k], v) for k, v in tensors.items())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert not torch.allclose(pretrained(x), distilled(x))


def test_checkpoint_of_another_backbone_names_both(tmp_path):
    summary, _ = small_run(tmp_path, "run", "trainer.epochs=1", "trainer.stop_after_steps=1")
    with pytest.raises(WeightLoadingError, match=r"'tiny'.*'siglip2-tiny'"):
        create_backbone("siglip2-tiny", checkpoint=summary["checkpoint"])
    with pytest.raises(WeightLoadingError, match="not found"):
        create_backbone("tiny", checkpoint=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("cache", ["true", "false"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, cache):
    common = [
        "trainer.epochs=3",
        "optim.lr=1e-3",
        "optim.schedule=cosine",
        f"teacher.cache={cache}",
    ]
    common += ["trainer.accumulate=2", "optim.warmup_steps=2"]
    images = write_scene_images(tmp_path / "images", count=5)
    full, _ = small_run(tmp_path, "full", *common, images=images)
    part, part_dir = small_run(
        tmp_path, "part", *common, "trainer.stop_after_steps=5", images=images
    )
    assert part["stopped_early"] and part["steps"] == 5
    resumed, resumed_dir = small_run(
        tmp_path, "resumed", *common, f"resume={part_dir}", images=images
    )
    expected = train_losses(tmp_path / "full")
    observed = {**train_losses(part_dir), **train_losses(resumed_dir)}
    assert sorted(observed) == sorted(expected) and len(expected) == full["steps"]
    for step, loss in expected.items():
        assert math.isclose(observed[step], loss, rel_tol=1e-5, abs_tol=1e-7), step
    assert resumed["steps"] == full["steps"]
    assert math.isclose(resumed["heldout_mse_after"], full["heldout_mse_after"], rel_tol=1e-5)
    assert resumed["heldout_mse_before"] == part["heldout_mse_before"]


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    images = write_scene_images(tmp_path / "images", count=5)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    for cache in ("true", "false"):
        with pytest.warns(UserWarning, match="broken.jpg"):
            summary, _ = small_run(
                tmp_path,
                f"cache-{cache}",
                "trainer.epochs=1",
                f"teacher.cache={cache}",
                images=images,
            )
        assert summary["skipped_images"] == 1
        assert summary["skipped_files"][0].endswith("broken.jpg")
        assert summary["steps"] == summary["train_views"]


def test_missing_or_empty_data_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_distillation(
            train_config(tmp_path, f"train_images.root={tmp_path / 'nowhere'}"), tmp_path
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        run_distillation(
            train_config(tmp_path, f"train_images.root={tmp_path / 'empty'}"), tmp_path
        )


def test_resume_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.safetensors"):
        resolve_resume_paths(tmp_path)


def test_configs_compose_with_the_documented_overrides(tmp_path):
    cfg = train_config(
        tmp_path, "backbone=siglip2", "train_images=sa1b", "train_images.root=/data/sa1b"
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["backbone"]["name"] == "siglip2"
    assert resolved["backbone"]["trainable_blocks"] == "last-2"  # the paper's blocks
    assert "train" not in resolved and "mode" not in resolved["teacher"]
    assert resolved["train_images"]["augment"]["bounds"] == [2048, 1024]
    assert resolved["train_images"]["max_images"] == 25000
    assert resolved["optim"]["lr"] == 2e-5 and resolved["trainer"]["epochs"] == 10
    # the teacher group's settings, then the training-only cache keys
    assert resolved["teacher"] == {
        "window": None,
        "stride": 24,
        "batch_size": 32,
        "compile": False,
        "cache": True,
        "cache_dir": f"{tmp_path / 'cache'}",
    }
    written = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))
    assert written["teacher"]["cache_dir"] == "outputs/teacher_cache/${backbone.name}"
    extended = train_config(tmp_path, "train_images=sa1b_extended", "train_images.root=/x")
    assert list(extended.train_images.augment.bounds) == [2560, 1280]
    assert list(extended.train_images.augment.scale_range) == [0.2, 1.0]
    assert extended.train_images.augment.min_crop == 512
    with pytest.raises(MissingMandatoryValue, match="root"):
        OmegaConf.to_container(train_config(tmp_path, "train_images=sa1b"), throw_on_missing=True)


@pytest.mark.parametrize(
    ("script", "override", "expected"),
    [
        (
            "train",
            "teacher.mode=online",
            "teacher.mode is now teacher.cache (teacher.mode=cached: "
            "teacher.cache=true, teacher.mode=online: teacher.cache=false)",
        ),
        (
            "cache_teacher",
            "train.unfreeze=all",
            "train.unfreeze is now backbone.trainable_blocks (e.g. backbone.trainable_blocks=all)",
        ),
        (
            "train",
            "data.root=/data/sa1b",
            "data is now train_images (data=sa1b: train_images=sa1b, data.root=...: "
            "train_images.root=...)",
        ),
    ],
)
def test_renamed_overrides_name_their_new_spelling(script, override, expected):
    with pytest.raises(SystemExit) as stop:
        reject_renamed_overrides([override], script)
    command = {"train": "spar-train", "cache_teacher": "spar-cache"}[script]
    assert expected in str(stop.value) and f"{command}: renamed settings" in str(stop.value)


@pytest.mark.slow
def test_the_train_script_refuses_a_renamed_override_before_hydra_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "teacher.mode=online"]
        + [f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "teacher.mode is now teacher.cache" in result.stderr
    assert not list(tmp_path.iterdir())  # refused before Hydra made the run directory


def test_renamed_settings_in_a_config_dict_name_their_new_spelling(tmp_path):
    config = OmegaConf.to_container(train_config(tmp_path), resolve=True)
    config["teacher"]["mode"] = "online"
    with pytest.raises(
        RenamedSettingError, match=r"prepare: .*teacher\.mode is now teacher\.cache"
    ):
        prepare(config)
    config["teacher"].pop("mode")
    config["train"] = {"unfreeze": "all"}
    with pytest.raises(
        RenamedSettingError, match=r"train\.unfreeze is now backbone\.trainable_blocks"
    ):
        prepare(config)
    config.pop("train")
    config["data"] = config["train_images"]
    with pytest.raises(RenamedSettingError, match=r"data is now train_images"):
        prepare(config)
    config.pop("data")
    config["teacher"]["cache"] = "online"
    with pytest.raises(ValueError, match="teacher.cache must be true or false, got 'online'"):
        prepare(config)


def test_epoch_order_is_a_padded_partition_over_ranks():
    shards = [epoch_order(7, seed=1, epoch=2, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    assert set().union(*shards) == set(range(7))
    assert epoch_order(7, 1, 2) != epoch_order(7, 1, 3)
    assert epoch_order(7, 1, 2) == epoch_order(7, 1, 2)


def test_learning_rate_schedule():
    cosine = OptimSettings(lr=1.0, schedule="cosine", warmup_steps=4)
    factors = [learning_rate_factor(step, 20, cosine) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[-1] < 0.05
    assert learning_rate_factor(10, 20, OptimSettings()) == 1.0


@pytest.mark.parametrize(
    "settings",
    [
        lambda: TrainerSettings(precision="fp8"),
        lambda: TrainerSettings(accumulate=0),
        lambda: OptimSettings(schedule="step"),
        lambda: OptimSettings(lr=0),
    ],
)
def test_bad_settings_are_rejected(settings):
    with pytest.raises(ValueError):
        settings()


def test_scene_images_are_deterministic(tmp_path):
    first = write_scene_images(tmp_path / "a", count=2)
    second = write_scene_images(tmp_path / "b", count=2)
    for a, b in zip(sorted(first.iterdir()), sorted(second.iterdir()), strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_bad_cache_entries_are_recomputed_by_fill_and_by_the_step(tmp_path):
    images = write_scene_images(tmp_path / "images", count=4)
    first, _ = small_run(tmp_path, "first", "trainer.epochs=1", images=images)
    assert first["cache"]["computed"] == 6  # 3 images x 2 draws
    training_entries = []  # the held-out maps live in the same cache
    for path in sorted((tmp_path / "cache").rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            if "augmentation" in json.loads(file.metadata()["description"])["view"]:
                training_entries.append(path)
    garbage, poisoned = training_entries[:2]
    garbage.write_bytes(b"\x00" * 64)
    cache = TeacherFeatureCache(tmp_path / "cache")
    key = poisoned.stem
    with safe_open(str(poisoned), framework="pt") as file:
        features, description = (
            file.get_tensor("features"),
            json.loads(file.metadata()["description"]),
        )
    features[0, 0, 0] = float("nan")
    cache.save(key, features, description)  # well-formed header, non-finite values
    with pytest.warns(UserWarning) as caught:
        second, _ = small_run(tmp_path, "second", "trainer.epochs=1", images=images)
    messages = [str(w.message) for w in caught]
    assert any(garbage.name in m and "unreadable" in m for m in messages), messages
    assert any(poisoned.name in m and "non-finite" in m for m in messages), messages
    assert second["cache"]["computed"] == 1  # the garbage file, caught by the header check
    repaired = cache.load(key, tuple(features.shape))
    assert repaired is not None and torch.isfinite(repaired).all()
    assert math.isclose(second["heldout_mse_after"], first["heldout_mse_after"], rel_tol=1e-3)


def test_bf16_autocast_and_gradient_clipping_run_on_cpu(tmp_path):
    summary, _ = small_run(
        tmp_path, "run", "trainer.epochs=1", "trainer.precision=bf16", "trainer.grad_clip=0.5"
    )
    assert summary["precision"] == "bfloat16" and summary["steps"] == summary["train_views"]
    assert math.isfinite(summary["heldout_mse_after"])


def test_tensorboard_events_or_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            small_run(tmp_path, "run", "trainer.epochs=1", "trainer.tensorboard=true")
    else:
        small_run(tmp_path, "run", "trainer.epochs=1", "trainer.tensorboard=true")
        assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_size_buckets_hold_one_size_and_cover_every_view():
    sizes = [(64, 96), (64, 96), (96, 64), (64, 96), None, (96, 64), (64, 96), (32, 32)]
    batches = bucket_batches(sizes, batch_size=3, seed=0, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(8))
    for batch in batches:
        assert len(batch) <= 3 and len({sizes[i] for i in batch}) == 1
    assert [4] in batches  # unknown size: alone
    assert batches == bucket_batches(sizes, 3, seed=0, epoch=0)
    assert batches != bucket_batches(sizes, 3, seed=0, epoch=1)
    shards = [bucket_batches(sizes, 3, 0, 0, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert {i for shard in shards for batch in shard for i in batch} == set(range(8))


def test_the_batch_sampler_deals_the_bucketed_batches_from_a_position(tmp_path):
    images = write_scene_images(tmp_path / "images", count=3, size=(120, 160))
    recipe = AugmentationRecipe(
        bounds=(160, 128), min_crop=64, min_short_side=64, crop_prob=0, size_multiple=64
    )
    paths = sorted(images.iterdir())
    views = DistillationViews(paths, images, recipe, (0,) * 3, (1,) * 3, draws_per_image=4)
    sampler = SizeBucketBatchSampler(views, batch_size=3, seed=7)
    sources = [image_size_or_none(path) for path in paths]
    for epoch in range(2):
        sizes = [views.view_size(i, sources, epoch) for i in range(len(views))]
        expected = bucket_batches(sizes, 3, seed=7, epoch=epoch)
        sampler.set_epoch(epoch)
        assert list(sampler) == expected and len(sampler) == len(expected)
        sampler.set_epoch(epoch, start=2)
        assert list(sampler) == expected[2:] and len(sampler) == len(expected) - 2


def test_bucketed_batches_train_and_resume_exactly(tmp_path):
    common = [
        "trainer.batch_size=4",
        "train_images.augment.size_multiple=64",
        "train_images.augment.crop_prob=0",
        "train_images.draws_per_image=4",
        "trainer.epochs=2",
        "optim.lr=1e-3",
    ]
    images = write_scene_images(tmp_path / "images", count=5)
    full, _ = small_run(tmp_path, "full", *common, images=images)
    assert full["images_seen"] == 2 * 16 and full["steps"] < 2 * 16  # batches of several views
    assert full["heldout_mse_after"] < full["heldout_mse_before"]
    _, part_dir = small_run(tmp_path, "part", *common, "trainer.stop_after_steps=3", images=images)
    resumed, resumed_dir = small_run(
        tmp_path, "resumed", *common, f"resume={part_dir}", images=images
    )
    expected = train_losses(tmp_path / "full")
    observed = {**train_losses(part_dir), **train_losses(resumed_dir)}
    assert sorted(observed) == sorted(expected)
    for step, loss in expected.items():
        assert math.isclose(observed[step], loss, rel_tol=1e-5, abs_tol=1e-7), step
    assert resumed["steps"] == full["steps"]


def test_a_missing_required_setting_is_named_with_its_full_key(tmp_path):
    with pytest.raises(ValueError, match=r"train_images\.root is required"):
        run_distillation(train_config(tmp_path, "train_images=sa1b"), tmp_path / "run")


def test_distributed_job_passes_errors_through_without_a_process_group():
    from spar.distributed import distributed_job

    with distributed_job():
        value = 1
    assert value == 1
    with pytest.raises(KeyError, match="boom"), distributed_job():
        raise KeyError("boom")


def poison_teacher_call(monkeypatch, call: int) -> None:
    """Make the ``call``-th teacher forward (1-based) return NaN everywhere."""
    original = SlidingWindowTeacher.forward
    calls = {"count": 0}

    def forward(self, images):
        calls["count"] += 1
        maps = original(self, images)
        return torch.full_like(maps, math.nan) if calls["count"] == call else maps

    monkeypatch.setattr(SlidingWindowTeacher, "forward", forward)


def assert_checkpoint_finite_at_step(run_dir, step):
    tensors, metadata = read_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    assert metadata["extra"]["step"] == step
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_a_non_finite_teacher_map_stops_training_naming_image_and_step(tmp_path, monkeypatch):
    # online: 2 held-out maps first, then one teacher call per micro-step; call 5 = step 2
    poison_teacher_call(monkeypatch, call=5)
    with pytest.raises(
        NonFiniteError, match=r"teacher map of \S+scene_0\d\.jpg \(view \d+\) at step 2"
    ):
        small_run(
            tmp_path, "run", "teacher.cache=false", "trainer.checkpoint_every=1", "trainer.epochs=1"
        )
    assert_checkpoint_finite_at_step(tmp_path / "run", 2)


def test_a_non_finite_teacher_map_stops_the_cache_fill_keeping_finished_entries(
    tmp_path, monkeypatch
):
    poison_teacher_call(monkeypatch, call=4)
    with pytest.raises(NonFiniteError, match=r"teacher map of \S+scene_0\d\.jpg"):
        small_run(tmp_path, "run")
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 3
    for entry in entries:
        with safe_open(str(entry), framework="pt") as file:
            assert all(torch.isfinite(file.get_tensor(k)).all() for k in file.keys())


def test_a_non_finite_loss_stops_training_before_the_optimizer_step(tmp_path, monkeypatch):
    original = StudentOptimizer.loss

    def loss(self, images, targets):
        value = original(self, images, targets)
        return value * math.nan if self.scheduler.last_epoch == 2 else value  # optimizer step 2

    monkeypatch.setattr(StudentOptimizer, "loss", loss)
    with pytest.raises(NonFiniteError, match=r"the loss at step 2 \(images: \S+scene_0\d\.jpg"):
        small_run(tmp_path, "run", "trainer.checkpoint_every=1", "trainer.epochs=1")
    assert_checkpoint_finite_at_step(tmp_path / "run", 2)


def test_a_non_finite_parameter_is_never_saved(tmp_path):
    backbone = create_backbone("tiny", trainable_blocks="last-2")
    path = save_checkpoint(tmp_path / "last.safetensors", backbone, {"step": 4})
    before = path.read_bytes()
    name, parameter = next((n, p) for n, p in backbone.named_parameters() if p.requires_grad)
    with torch.no_grad():
        parameter.view(-1)[3] = math.inf
    with pytest.raises(NonFiniteError, match=rf"parameter {name}, to be saved in \S+ at step 5"):
        save_checkpoint(path, backbone, {"step": 5})
    assert path.read_bytes() == before


def test_renamed_python_names_give_their_new_spelling(tmp_path):
    with pytest.raises(ImportError, match=r"fill_teacher_cache is now TeacherTargets"):
        from spar.distill import fill_teacher_cache  # noqa: F401
    with pytest.raises(TypeError, match=r"cache= is now targets=TeacherTargets"):
        DistillationViews([], tmp_path, None, (0.0,) * 3, (1.0,) * 3, cache=None)
    with pytest.raises(TypeError, match=r"teacher= is now targets=TeacherTargets"):
        Distiller(
            None, teacher=None, views=None, heldout=[], out_dir=tmp_path, optim=None, settings=None
        )
