"""scripts/train.py and scripts/cache_teacher.py as users run them, and under torchrun (gloo)."""

import json

import pytest
from helpers import SMALL_TRAINING, run_script, write_scene_images

SMALL = [*SMALL_TRAINING, "device=cpu"]


def test_cache_script_then_training_reuses_every_entry(tmp_path):
    images = write_scene_images(tmp_path / "images", count=4)
    common = [f"train_images.root={images}", f"teacher.cache_dir={tmp_path / 'cache'}", *SMALL]
    filled = run_script(
        "cache_teacher.py", *common, f"hydra.run.dir={tmp_path / 'fill'}", cwd=tmp_path
    )
    assert "3 computed, 0 reused" in filled.stdout
    stats = json.loads((tmp_path / "fill" / "cache_summary.json").read_text())
    assert stats["computed"] == 3
    trained = run_script(
        "train.py", *common, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'train'}", cwd=tmp_path
    )
    assert "held-out 160x128" in trained.stdout
    summary = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    assert summary["cache"] == {"computed": 0, "reused": 3, "skipped": 0}
    assert summary["steps"] == 6 and (tmp_path / "train" / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "online"])
def test_two_process_gloo_run_trains_and_saves_once(tmp_path, cache):
    images = write_scene_images(tmp_path / "images", count=5)
    result = run_script(
        "train.py",
        f"train_images.root={images}",
        f"teacher.cache_dir={tmp_path / 'cache'}",
        f"teacher.cache={str(cache).lower()}",
        "trainer.epochs=2",
        "optim.lr=1e-3",
        *SMALL,
        ranks=2,
        cwd=tmp_path,
        timeout=400,
    )
    runs = list((tmp_path / "outputs" / "train" / "tiny").iterdir())
    assert len(runs) == 1, runs  # both ranks agree on one run directory
    run_dir = runs[0]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    # 4 training views over 2 ranks: 2 steps per epoch, each step seeing one view per rank.
    assert summary["steps"] == 4 and summary["images_seen"] == 8
    assert summary["heldout_mse_after"] < summary["heldout_mse_before"]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["best.safetensors", "last.safetensors", "last.state.pt"]
    assert result.stdout.count("held-out 160x128") == 1  # printed by rank 0 only
    if cache:
        assert summary["cache"]["computed"] == 4
