"""checkpoint=: our SPAR checkpoints and the released formats (Lightning .ckpt, plain state
dicts), detected and mapped onto our backbones, with clear errors."""

import os
import pathlib
from collections import defaultdict

import pytest
import torch
from helpers import LightningAttributeDict, register_fake_lightning
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from spar.models import WeightLoadingError, backbone_entry, create_backbone, list_backbones
from spar.models.checkpoint import load_any_checkpoint, read_released_weights, save_checkpoint
from spar.models.weights import read_weight_file


class TrainingHyperParameters(dict):
    """Stands for a class of the authors' training code pickled into a Lightning checkpoint."""


class DeletesAFile:
    """Unpickling this would delete a file: the loader must never call it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.remove, (self.path,))


@pytest.fixture(autouse=True)
def lightning_module(monkeypatch):
    register_fake_lightning(monkeypatch)


TINY_NAMES = [name for name in list_backbones() if backbone_entry(name).default_pretrained is None]


@pytest.fixture(params=TINY_NAMES)
def source(request):
    """(name, a randomly initialised model of that family whose weights we release)."""
    return request.param, create_backbone(request.param, pretrained=None, seed=7)


def model_state(backbone):
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def write_lightning(path, state, extra=None):
    checkpoint = {
        "epoch": 9,
        "global_step": 250000,
        "state_dict": {
            **{f"segmentor.net.{k}": v for k, v in state.items()},
            "segmentor.teacher.model.visual.proj": torch.zeros(2, 2),  # not ours: ignored
        },
        "hyper_parameters": LightningAttributeDict(lr=2e-5, backbone="siglip2", callbacks=[]),
        "hparams_name": "kwargs",
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'miou'}": {"best_model_score": torch.tensor(0.4)}
        },
        **(extra or {}),
    }
    torch.save(checkpoint, path)


def assert_weights_equal(backbone, state):
    loaded = backbone.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_lightning_checkpoint_loads_the_whole_model(tmp_path, source):
    name, released = source
    write_lightning(tmp_path / "spar.ckpt", model_state(released))
    fmt, state = read_released_weights(tmp_path / "spar.ckpt")
    assert fmt == "lightning" and all(k.startswith("model.") for k in state)
    backbone = create_backbone(name, checkpoint=tmp_path / "spar.ckpt")
    assert_weights_equal(backbone, model_state(released))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_plain_state_dict_loads(tmp_path, source, suffix):
    name, released = source
    path = tmp_path / f"spar{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model_state(released).items()}, str(path))
    else:
        torch.save(model_state(released), path)
    fresh = create_backbone(name)
    assert load_any_checkpoint(fresh, path)["format"] == "plain"
    assert_weights_equal(fresh, model_state(released))


def test_our_checkpoint_is_detected(tmp_path, tiny_backbone):
    trained = create_backbone("tiny", trainable_blocks="last-2")
    path = save_checkpoint(tmp_path / "ours.safetensors", trained)
    fresh = create_backbone("tiny")
    assert load_any_checkpoint(fresh, path)["format"] == "spar"


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    released = create_backbone("tiny", pretrained=None, seed=3)
    state = model_state(released)
    state.pop("model.visual.proj")
    state["model.visual.extra_head.weight"] = torch.zeros(3)
    write_lightning(tmp_path / "broken.ckpt", state)
    with pytest.raises(WeightLoadingError) as error:
        create_backbone("tiny", checkpoint=tmp_path / "broken.ckpt")
    message = str(error.value)
    assert "broken.ckpt (lightning format)" in message
    assert "missing keys: model.visual.proj" in message
    assert "unexpected keys: model.visual.extra_head.weight" in message


def test_checkpoint_of_another_architecture_reports_shapes(tmp_path):
    released = create_backbone("tiny", pretrained=None, width=96)
    torch.save(model_state(released), tmp_path / "wide.pth")
    with pytest.raises(WeightLoadingError, match="shape mismatches"):
        create_backbone("tiny", checkpoint=tmp_path / "wide.pth")


def test_unrecognised_layout_names_the_expected_ones(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(
        WeightLoadingError, match=r"unrecognised.*encoder\.weight.*segmentor\.net\.model"
    ):
        create_backbone("tiny", checkpoint=tmp_path / "other.pth")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(WeightLoadingError, match="junk.ckpt"):
        create_backbone("tiny", checkpoint=tmp_path / "junk.ckpt")


def test_omegaconf_hyper_parameters_are_read_without_their_code(tmp_path):
    released = create_backbone("tiny", pretrained=None, seed=2)
    config = OmegaConf.create(
        {"optim": {"lr": 2e-5, "betas": [0.9, 0.999]}, "resume": None, "root": pathlib.Path("/d")}
    )
    write_lightning(tmp_path / "spar.ckpt", model_state(released), {"hyper_parameters": config})
    backbone = create_backbone("tiny", checkpoint=tmp_path / "spar.ckpt")
    assert_weights_equal(backbone, model_state(released))
    stand_in = read_weight_file(tmp_path / "spar.ckpt")["hyper_parameters"]
    assert type(stand_in).__name__ == "DictConfig" and not isinstance(stand_in, DictConfig)


def test_stand_ins_are_plain_values_or_inert(tmp_path):
    torch.save(
        {
            "hparams": LightningAttributeDict(lr=2e-5),
            "counts": defaultdict(list, {"val": [1]}),
            "root": pathlib.Path("/data"),
        },
        tmp_path / "extras.ckpt",
    )
    content = read_weight_file(tmp_path / "extras.ckpt")
    assert type(content["hparams"]) is dict and content["hparams"] == {"lr": 2e-5}
    assert type(content["counts"]) is dict and content["counts"] == {"val": [1]}
    assert not isinstance(content["root"], pathlib.PurePath)


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    released = create_backbone("tiny", pretrained=None, seed=1)
    path = tmp_path / "hostile.ckpt"
    write_lightning(path, model_state(released), {"trap": DeletesAFile(str(victim))})
    with pytest.raises(WeightLoadingError) as error:
        create_backbone("tiny", checkpoint=path)
    assert f"refused to read {path}: it names {os.remove.__module__}.remove." in str(error.value)
    assert victim.read_text() == "still here"


def test_an_unknown_class_in_the_hyper_parameters_is_refused(tmp_path):
    released = create_backbone("tiny", pretrained=None, seed=1)
    path = tmp_path / "custom.ckpt"
    write_lightning(path, model_state(released), {"hyper_parameters": TrainingHyperParameters()})
    with pytest.raises(WeightLoadingError) as error:
        create_backbone("tiny", checkpoint=path)
    name = f"{TrainingHyperParameters.__module__}.{TrainingHyperParameters.__qualname__}"
    assert f"refused to read {path}: it names {name}." in str(error.value)
