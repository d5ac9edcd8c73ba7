"""spar.provenance: fingerprints of settings, weights and data, and the check against them."""

import hashlib
import os

import numpy as np
import pytest
import torch
from torch import nn

from spar.provenance import (
    ProvenanceError,
    check_fingerprint,
    file_digest,
    image_list_fingerprint,
    settings_fingerprint,
    tensors_digest,
    weights_digest,
)


def test_settings_fingerprint_flattens_to_dotted_keys_and_drops_ignored_groups():
    settings = {"optim": {"lr": 1e-3, "betas": (0.9, 0.99)}, "trainer": {"log_every": 5}, "x": 1}
    assert settings_fingerprint(settings, ignore=["trainer"]) == {
        "optim.lr": 1e-3,
        "optim.betas": [0.9, 0.99],
        "x": 1,
    }
    assert settings_fingerprint(settings, only=["optim.lr"]) == {"optim.lr": 1e-3}


def test_check_fingerprint_lists_every_differing_key_with_both_values():
    recorded = {"optim.lr": 0.001, "teacher.stride": 32, "weights": "aa"}
    current = {"optim.lr": 0.01, "teacher.stride": 16, "weights": "aa"}
    with pytest.raises(ProvenanceError) as error:
        check_fingerprint(recorded, current, "runs/a")
    message = str(error.value)
    assert "runs/a" in message
    assert "optim.lr: 0.001 -> 0.01" in message
    assert "teacher.stride: 32 -> 16" in message
    assert "weights:" not in message
    assert "\n" not in message


def test_check_fingerprint_returns_allowed_changes_and_refuses_unknown_allow_keys():
    recorded = {"optim.lr": 0.001, "optim.weight_decay": 0.0}
    current = {"optim.lr": 0.0005, "optim.weight_decay": 0.0}
    assert check_fingerprint(recorded, current, "run", allow=["optim.lr"]) == {
        "optim.lr": (0.001, 0.0005)
    }
    assert check_fingerprint(recorded, current, "run", allow=["optim"]) == {
        "optim.lr": (0.001, 0.0005)
    }
    with pytest.raises(ProvenanceError, match="optim.rl"):
        check_fingerprint(recorded, current, "run", allow=["optim.rl"])


def test_a_key_present_on_one_side_only_is_a_difference():
    with pytest.raises(ProvenanceError, match="teacher.dtype: null -> "):
        check_fingerprint({"a": 1}, {"a": 1, "teacher.dtype": "bfloat16"}, "x")


def test_tensors_digest_matches_an_independent_blake2b_and_sees_one_changed_element():
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    expected = hashlib.blake2b(digest_size=16)
    expected.update(b"w|float32|(2, 3)|")
    expected.update(np.arange(6, dtype=np.float32).tobytes())
    assert tensors_digest({"w": weight}) == expected.hexdigest()
    changed = weight.clone()
    changed[1, 2] = 5.0001
    assert tensors_digest({"w": changed}) != tensors_digest({"w": weight})
    assert tensors_digest({"w": weight.double()}) != tensors_digest({"w": weight})
    assert tensors_digest({"v": weight}) != tensors_digest({"w": weight})


def test_weights_digest_is_content_not_identity():
    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    second = nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    assert weights_digest(first) == weights_digest(second)
    with torch.no_grad():
        second.bias[0] += 1e-6
    assert weights_digest(first) != weights_digest(second)


def test_file_digest_sees_a_rewrite_in_place(tmp_path):
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"version one")
    first = file_digest(path)
    assert first == hashlib.blake2b(b"version one", digest_size=16).hexdigest()
    path.write_bytes(b"version two")
    os.utime(path, ns=(1, 2))
    assert file_digest(path) == hashlib.blake2b(b"version two", digest_size=16).hexdigest()


def test_image_list_fingerprint_changes_when_one_image_is_swapped(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(name.encode())
    before = image_list_fingerprint(sorted(tmp_path.iterdir()), tmp_path)
    assert before.startswith("3 images, ")
    (tmp_path / "b.jpg").unlink()
    (tmp_path / "d.jpg").write_bytes(b"d.jpg")
    after = image_list_fingerprint(sorted(tmp_path.iterdir()), tmp_path)
    assert after.startswith("3 images, ") and after != before
