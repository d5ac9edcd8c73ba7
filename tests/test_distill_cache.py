"""Teacher cache: round trip, keys that change with everything the maps depend on, bad entries,
resumable filling through the targets' owner; the training views that feed it."""

import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from spar.distill import (
    AugmentationRecipe,
    DistillationViews,
    TeacherFeatureCache,
    TeacherTargets,
    entry_key,
    split_images,
    teacher_identity,
    weights_digest,
)
from spar.distill.cache import image_identity
from spar.distributed import DistributedContext
from spar.models import SlidingWindowTeacher

SMALL = AugmentationRecipe(bounds=(128, 96), min_crop=32, min_short_side=32)


def write_images(folder, count=3, size=(96, 128), corrupt=()):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"img_{index:02d}.png"
        if index in corrupt:
            path.write_bytes(b"not an image")
        else:
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def teacher(tiny_backbone):
    # A copy: the targets freeze their teacher, and the shared backbone must stay as it is.
    return SlidingWindowTeacher(copy.deepcopy(tiny_backbone), window=64, stride=24, batch_size=8)


def make_views(paths, root, targets, **kwargs):
    """Views of ``paths`` keyed by ``targets`` (a TeacherTargets, or None: unkeyed)."""
    return DistillationViews(paths, root, SMALL, (0.5,) * 3, (0.25,) * 3, targets=targets, **kwargs)


def cached_targets(teacher, root, cache):
    return TeacherTargets(teacher, root, cache=cache, name="tiny")


def test_round_trip_is_float16_and_close(tmp_path):
    cache = TeacherFeatureCache(tmp_path)
    features = torch.randn(8, 5, 7)
    cache.save("ab" * 32, features, {"note": "test"})
    loaded = cache.load("ab" * 32, (8, 5, 7))
    assert loaded.dtype == torch.float16
    torch.testing.assert_close(loaded.float(), features, atol=2e-3, rtol=2e-3)
    assert cache.has("ab" * 32, (8, 5, 7)) and not cache.has("ab" * 32, (8, 5, 6))
    assert not list(tmp_path.rglob("*.tmp*"))


def test_weights_digest_follows_the_weights(tiny_backbone):
    twin = copy.deepcopy(tiny_backbone)
    assert weights_digest(twin) == weights_digest(tiny_backbone)
    with torch.no_grad():
        twin.blocks[0].mlp.c_fc.bias[0] += 1e-3
    assert weights_digest(twin) != weights_digest(tiny_backbone)


def test_keys_change_with_backbone_stride_window_image_and_view(tmp_path, tiny_backbone):
    image = write_images(tmp_path / "a", count=1)[0]
    base = SlidingWindowTeacher(tiny_backbone, window=64, stride=24)
    identity = teacher_identity(base, "tiny")
    image_part = image_identity(image, tmp_path)
    view = {"augmentation": {"flip": False}}
    key = entry_key(identity, image_part, view)
    assert key == entry_key(teacher_identity(base, "tiny"), image_part, view)
    changed_backbone = copy.deepcopy(tiny_backbone)
    with torch.no_grad():
        changed_backbone.blocks[-1].ln_1.weight.mul_(1.01)
    variants = [
        entry_key(
            teacher_identity(SlidingWindowTeacher(tiny_backbone, 64, 32), "tiny"), image_part, view
        ),
        entry_key(
            teacher_identity(SlidingWindowTeacher(tiny_backbone, 96, 24), "tiny"), image_part, view
        ),
        entry_key(
            teacher_identity(SlidingWindowTeacher(changed_backbone, 64, 24), "tiny"),
            image_part,
            view,
        ),
        entry_key(identity, image_part, {"augmentation": {"flip": True}}),
        entry_key(identity, {**image_part, "bytes": image_part["bytes"] + 1}, view),
        entry_key(identity, {**image_part, "path": "other.png"}, view),
    ]
    assert key not in variants and len(set(variants)) == len(variants)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan", "wrong_key"])
def test_bad_entries_are_reported_and_not_trusted(tmp_path, damage):
    cache = TeacherFeatureCache(tmp_path)
    key = "cd" * 32
    features = torch.randn(4, 3, 3)
    if damage == "nan":
        features[0, 0, 0] = float("nan")
    if damage == "wrong_key":
        # A valid file under another entry's name (e.g. copied by hand): its key says otherwise.
        source = cache.save("ef" * 32, features, {})
        cache.path(key).parent.mkdir(parents=True, exist_ok=True)
        source.rename(cache.path(key))
    else:
        path = cache.save(key, features, {})
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            path.write_bytes(b"\x00" * len(data))
    with pytest.warns(UserWarning, match=str(cache.path(key).name)):
        assert cache.load(key, (4, 3, 3)) is None


def test_wrong_shape_is_recomputed_not_trusted(tmp_path):
    cache = TeacherFeatureCache(tmp_path)
    cache.save("12" * 32, torch.randn(4, 3, 3), {})
    with pytest.warns(UserWarning, match="shape"):
        assert cache.load("12" * 32, (4, 3, 4)) is None
    assert cache.load("34" * 32, (4, 3, 3)) is None  # missing: no warning, just absent


def test_views_are_keyed_fixed_across_epochs_and_skip_corrupt_images(tmp_path, teacher):
    paths = write_images(tmp_path / "imgs", count=3, corrupt=(1,))
    cache = TeacherFeatureCache(tmp_path / "cache")
    targets = cached_targets(teacher, tmp_path / "imgs", cache)
    views = make_views(paths, tmp_path / "imgs", targets, draws_per_image=2)
    assert len(views) == 6
    first = views[0]
    assert first["skipped"] is None and first["target"] is None
    assert first["image"].shape[-2:] == first["plan"].output
    assert all(side % 16 == 0 for side in first["image"].shape[-2:])
    views.set_epoch(3)
    again = views[0]
    assert again["key"] == first["key"] and again["plan"] == first["plan"]
    assert views[1]["key"] != first["key"]  # another draw of the same image
    broken = views[2]
    assert broken["skipped"] and "img_01.png" in broken["skipped"] and "image" not in broken


def test_online_views_change_every_epoch(tmp_path, teacher):
    paths = write_images(tmp_path / "imgs", count=1, size=(200, 300))
    views = make_views(paths, tmp_path / "imgs", None, fixed_views=False)
    plans = set()
    for epoch in range(6):
        views.set_epoch(epoch)
        plans.add(views[0]["plan"])
    assert len(plans) > 1 and views[0]["key"] is None


def test_fill_is_resumable_and_loaded_targets_match_the_teacher(tmp_path, teacher, monkeypatch):
    paths = write_images(tmp_path / "imgs", count=4, corrupt=(3,))
    cache = TeacherFeatureCache(tmp_path / "cache")
    targets = cached_targets(teacher, tmp_path / "imgs", cache)
    views = make_views(paths, tmp_path / "imgs", targets)
    forward, calls = SlidingWindowTeacher.forward, []

    def interrupted_forward(self, images):
        """Fails on the second image (a killed job)."""
        calls.append(images)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(self, images)

    with monkeypatch.context() as patch:
        patch.setattr(SlidingWindowTeacher, "forward", interrupted_forward)
        with pytest.raises(KeyboardInterrupt):
            targets.fill(views, DistributedContext(), show_progress=False)
    assert len(list(cache.root.rglob("*.safetensors"))) == 1
    assert not list(cache.root.rglob("*.tmp*"))

    stats = targets.fill(views, DistributedContext(), show_progress=False)
    assert (stats["computed"], stats["reused"], stats["skipped"]) == (2, 1, 1)
    assert stats["skipped_files"] == [str(paths[3])]
    again = targets.fill(views, DistributedContext(), show_progress=False)
    assert (again["computed"], again["reused"]) == (0, 3)

    item = views[0]
    with torch.no_grad():
        expected = teacher(item["image"][None])[0]
    assert item["target"].shape == expected.shape
    torch.testing.assert_close(item["target"].float(), expected, atol=5e-3, rtol=5e-3)
    assert views.without_targets()[0]["target"] is None and views[0]["target"] is not None


def test_fill_refuses_views_keyed_by_other_targets_or_no_cache(tmp_path, teacher):
    paths = write_images(tmp_path / "imgs", count=1)
    cache = TeacherFeatureCache(tmp_path / "cache")
    targets = cached_targets(teacher, tmp_path / "imgs", cache)
    other = make_views(paths, tmp_path / "imgs", cached_targets(teacher, tmp_path / "imgs", cache))
    with pytest.raises(ValueError, match="keyed by these targets"):
        targets.fill(other, DistributedContext(), show_progress=False)
    online = TeacherTargets(teacher, tmp_path / "imgs")
    with pytest.raises(ValueError, match="no cache"):
        online.fill(make_views(paths, tmp_path / "imgs", online), DistributedContext())


def test_get_or_compute_reads_stored_maps_and_stores_missing_ones(tmp_path, teacher):
    image_path = write_images(tmp_path / "imgs", count=1)[0]
    targets = cached_targets(teacher, tmp_path / "imgs", TeacherFeatureCache(tmp_path / "cache"))
    key = targets.key_for(image_path, {"resize_to_fit": [128, 96]})
    assert key == targets.key_for(image_path, {"resize_to_fit": [128, 96]})
    parts = key.description
    assert key.name == entry_key(targets.identity, parts["image"], parts["view"])
    assert parts["image"]["path"] == image_path.name  # relative to the data root
    image = torch.randn(3, 96, 128)
    assert targets.load(key, (96, 128)) is None
    computed = targets.get_or_compute(image, key, "a test image")
    assert computed.dtype == torch.float32 and computed.shape == targets.shape_for((96, 128))
    stored = targets.get_or_compute(torch.zeros_like(image), key, "a test image")
    assert stored.dtype == torch.float16  # read back: the teacher did not run on the zeros
    torch.testing.assert_close(stored.float(), computed, atol=5e-3, rtol=5e-3)


def test_fill_shards_over_ranks(tmp_path, teacher, monkeypatch):
    paths = write_images(tmp_path / "imgs", count=5)
    cache = TeacherFeatureCache(tmp_path / "cache")
    targets = cached_targets(teacher, tmp_path / "imgs", cache)
    views = make_views(paths, tmp_path / "imgs", targets)
    # Two ranks run one after the other here, so the collectives are left out.
    monkeypatch.setattr(DistributedContext, "all_reduce_sum", lambda self, values: values)
    monkeypatch.setattr(DistributedContext, "barrier", lambda self: None)
    computed = []
    for rank in range(2):
        context = DistributedContext(rank=rank, world_size=2)
        stats = targets.fill(views, context, show_progress=False)
        computed.append(stats["computed"])
    assert computed == [3, 2]
    assert len(list(cache.root.rglob("*.safetensors"))) == 5


def test_split_holds_out_the_last_images(tmp_path):
    paths = sorted(write_images(tmp_path, count=5))
    split = split_images(paths, 2, max_train=2)
    assert split.train == paths[:2] and split.heldout == paths[3:]
    with pytest.raises(ValueError, match="5 image"):
        split_images(paths, 5)


def test_no_warning_for_good_entries(tmp_path):
    cache = TeacherFeatureCache(tmp_path)
    cache.save("56" * 32, torch.randn(2, 2, 2), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load("56" * 32, (2, 2, 2)) is not None


def _header_end(path):
    import struct

    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("where", ["data", "description", "checksum"])
def test_flipped_bytes_fail_the_checksum_and_are_named(tmp_path, where):
    cache = TeacherFeatureCache(tmp_path)
    key = "9a" * 32
    path = cache.save(key, torch.randn(4, 3, 3), {"view": "a description"})
    data = bytearray(path.read_bytes())
    if where == "data":
        positions = range(_header_end(path), len(data), 7)  # several data bytes
    else:
        text = data[8 : _header_end(path)].decode()
        marker = "a description" if where == "description" else '"checksum":"'
        positions = [8 + text.index(marker) + len(marker) + (0 if where == "checksum" else -3)]
    for position in positions:
        data[position] ^= 0x04
    path.write_bytes(bytes(data))
    assert cache.has(key, (4, 3, 3))  # the header still parses: found when the data is read
    with pytest.warns(UserWarning, match=f"{path.name} is damaged"):
        assert cache.load(key, (4, 3, 3)) is None


def test_an_entry_without_a_checksum_is_not_trusted(tmp_path):
    from safetensors.torch import save_file

    cache = TeacherFeatureCache(tmp_path)
    key = "7b" * 32
    cache.path(key).parent.mkdir(parents=True)
    save_file(
        {"features": torch.zeros(2, 2, 2, dtype=torch.float16)},
        str(cache.path(key)),
        metadata={"key": key, "description": "{}"},
    )
    with pytest.warns(UserWarning, match="without a checksum"):
        assert not cache.has(key, (2, 2, 2), warn=True)
    with pytest.warns(UserWarning, match="without a checksum"):
        assert cache.load(key, (2, 2, 2)) is None


def test_fill_reports_bad_headers_by_name_and_recomputed_maps_equal_stored_ones(tmp_path, teacher):
    paths = write_images(tmp_path / "imgs", count=2)
    cache = TeacherFeatureCache(tmp_path / "cache")
    targets = cached_targets(teacher, tmp_path / "imgs", cache)
    views = make_views(paths, tmp_path / "imgs", targets)
    targets.fill(views, DistributedContext(), show_progress=False)
    item = views[0]
    entry = cache.path(item["key"].name)
    stored = cache.load(item["key"].name, targets.shape_for(item["plan"].output))
    entry.write_bytes(entry.read_bytes()[:-10])  # truncated
    with pytest.warns(UserWarning, match=entry.name):
        stats = targets.fill(views, DistributedContext(), show_progress=False)
    assert (stats["computed"], stats["reused"]) == (1, 1)
    recomputed = targets.compute(item["image"], item["key"], "a view")
    assert recomputed.dtype == torch.float32  # the stored float16 values, as float32
    assert torch.equal(recomputed, stored.float())
