"""The teacher-cache key follows the precision the teacher's windows run at.

An fp32 and a bf16 teacher over the same backbone stitch maps that differ (by up to ~0.015 on
the tiny models), so a cache entry of one must never be read as the other's.
"""

import copy
import json

import torch

from spar.distill import TeacherFeatureCache, TeacherTargets, entry_key, teacher_identity
from spar.models import SlidingWindowTeacher

IMAGE = {"path": "a.png", "bytes": 10, "mtime_ns": 1}
VIEW = {"augmentation": {"flip": False}}


def key_of(teacher):
    return entry_key(teacher_identity(teacher, "tiny"), IMAGE, VIEW)


def test_fp32_and_bf16_teachers_of_one_backbone_get_different_keys(tiny_backbone):
    fp32 = SlidingWindowTeacher(tiny_backbone, window=64, stride=24)
    bf16 = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, dtype=torch.bfloat16)
    fp16 = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, dtype=torch.float16)
    assert len({key_of(fp32), key_of(bf16), key_of(fp16)}) == 3


def test_equal_settings_give_equal_keys(tiny_backbone):
    first = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, dtype=torch.bfloat16)
    second = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, dtype=torch.bfloat16)
    assert key_of(first) == key_of(second)
    plain = SlidingWindowTeacher(tiny_backbone, window=64, stride=24)
    assert key_of(plain) == key_of(SlidingWindowTeacher(tiny_backbone, window=64, stride=24))


def test_a_teacher_converted_in_place_is_keyed_like_a_copied_one_of_that_dtype(tiny_backbone):
    copied = SlidingWindowTeacher(tiny_backbone, window=64, stride=24, dtype=torch.bfloat16)
    in_place = SlidingWindowTeacher(
        copy.deepcopy(tiny_backbone),
        window=64,
        stride=24,
        dtype=torch.bfloat16,
        copy_backbone=False,
    )
    assert teacher_identity(copied)["window_dtype"] == "torch.bfloat16"
    assert teacher_identity(in_place)["window_dtype"] == "torch.bfloat16"


def test_an_identity_without_the_dtype_field_is_not_the_current_key(tiny_backbone):
    """An entry written before the dtype joined the key (its identity lacks the field) has
    another name, so it is never found: it is simply recomputed."""
    teacher = SlidingWindowTeacher(tiny_backbone, window=64, stride=24)
    identity = teacher_identity(teacher, "tiny")
    old = {k: v for k, v in identity.items() if k != "window_dtype"}
    old["format"] = 2
    assert entry_key(old, IMAGE, VIEW) != entry_key(identity, IMAGE, VIEW)
    json.dumps(identity)  # the identity stays plain JSON


def test_an_entry_of_the_fp32_teacher_or_of_the_old_format_is_not_read_for_another(
    tmp_path, tiny_backbone
):
    image = tmp_path / "a.png"
    image.write_bytes(b"pixels")
    cache = TeacherFeatureCache(tmp_path / "cache")
    fp32 = TeacherTargets(
        SlidingWindowTeacher(copy.deepcopy(tiny_backbone), window=64, stride=24),
        tmp_path,
        cache=cache,
    )
    bf16 = TeacherTargets(
        SlidingWindowTeacher(
            copy.deepcopy(tiny_backbone), window=64, stride=24, dtype=torch.bfloat16
        ),
        tmp_path,
        cache=cache,
    )
    shape = fp32.shape_for((32, 48))
    stored = fp32.key_for(image, VIEW)
    cache.save(stored.name, torch.zeros(shape), stored.description)
    assert fp32.load(stored, (32, 48)) is not None
    assert bf16.load(bf16.key_for(image, VIEW), (32, 48)) is None
    # an entry written before the dtype joined the identity (format 2, no window_dtype field)
    old_identity = {k: v for k, v in bf16.identity.items() if k != "window_dtype"}
    old_identity["format"] = 2
    current = bf16.key_for(image, VIEW)
    old_key = entry_key(old_identity, current.description["image"], VIEW)
    cache.save(old_key, torch.zeros(shape), {**current.description, "teacher": old_identity})
    assert bf16.load(current, (32, 48)) is None
