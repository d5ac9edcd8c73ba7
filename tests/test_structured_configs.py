"""The settings dataclasses are the one owner of their defaults: every command's config composes
through the structured configs of ``spar.configs`` (``schema/...``), the composed values are the
dataclass defaults, no YAML file writes a default again, and the overrides users pass (lists,
nulls, mode names) still compose, leaving the one-line errors to spar's own checks."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import MISSING, OmegaConf

from spar.config import SettingError
from spar.configs import CONFIG_DIR, SCHEMAS
from spar.distill.settings import OptimSettings, TrainerSettings, check_training_config
from spar.models.teacher import TeacherSettings, check_teacher_settings
from spar.protocol import BenchmarkSettings, EvalProtocol
from spar.refine.anyup import AnyUpSettings
from spar.refine.lposs import AffinitySettings, LPOSSSettings

#: The values a command's config requires (``???``), filled in to compose it.
REQUIRED = {
    "segment": ["image=x.jpg", "classes=[sky,road]"],
    "extract_features": ["images=photos"],
}
#: Every command's config: each top-level YAML file (train, eval, segment, speed, ...).
COMMANDS = {path.stem: REQUIRED.get(path.stem, []) for path in CONFIG_DIR.glob("*.yaml")}


def _compose(name: str, overrides: list[str] = ()) -> dict:
    with initialize_config_module("spar.configs", version_base="1.3"):
        cfg = compose(config_name=name, overrides=[*COMMANDS.get(name, []), *overrides])
    return OmegaConf.to_container(cfg, resolve=False)


def _defaults(schema: type) -> dict:
    """The schema's field defaults as a config holds them (tuples as lists, nested as dicts)."""
    values = {}
    for field in dataclasses.fields(schema):
        if field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = field.default
        if dataclasses.is_dataclass(value):
            value = _defaults(type(value))
        values[field.name] = list(value) if isinstance(value, tuple) else value
    return values


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_config_composes(name):
    assert _compose(name)


def test_the_commands_are_all_there():
    assert {"train", "cache_teacher", "eval", "segment", "extract_features", "speed"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize(
    ("name", "overrides", "section", "schema"),
    [
        ("train", ["train_images=sa1b"], "optim", OptimSettings),
        ("train", ["train_images=sa1b"], "trainer", TrainerSettings),
        ("eval", [], "teacher", TeacherSettings),
        ("segment", [], "teacher", TeacherSettings),
        ("extract_features", [], "teacher", TeacherSettings),
        ("eval", ["refine=lposs"], "refine", LPOSSSettings),
        ("segment", ["refine=lposs"], "refine", LPOSSSettings),
        ("eval", ["upsample=anyup"], "upsample", AnyUpSettings),
        ("speed", ["upsample=anyup"], "upsample", AnyUpSettings),
    ],
)
def test_composed_sections_are_the_dataclass_defaults(name, overrides, section, schema):
    assert _compose(name, overrides)[section] == _defaults(schema)


def test_the_defaults_arrive_where_they_are_read():
    """Literal values of the paper's settings, where each command reads them."""
    train = _compose("train", ["train_images=sa1b"])
    assert (train["optim"]["lr"], train["optim"]["betas"]) == (2e-5, [0.9, 0.999])
    assert (train["trainer"]["epochs"], train["trainer"]["grad_clip"]) == (10, None)
    assert train["teacher"] == {
        "window": None,
        "stride": 24,
        "batch_size": 32,
        "compile": False,
        "cache": True,
        "cache_dir": "outputs/teacher_cache/${backbone.name}",
    }
    demo = _compose("train")  # the demo preset sets its own optimiser and loop values
    assert (demo["optim"]["lr"], demo["optim"]["schedule"], demo["trainer"]["epochs"]) == (
        1e-3,
        "cosine",
        8,
    )
    eval_cfg = _compose("eval", ["dataset=ade20k", "refine=lposs_plus"])
    assert eval_cfg["templates"] == "imagenet80"
    assert eval_cfg["dataset"]["bounds"] == [2048, 672]
    assert eval_cfg["dataset"]["logit_scale"] == 40
    assert eval_cfg["refine"]["name"] == "lposs_plus"
    assert (eval_cfg["refine"]["k"], eval_cfg["refine"]["neighbourhood"]) == (400, 13)
    segment = _compose("segment")
    assert (segment["bounds"], segment["logit_scale"], segment["templates"]) == (
        [2048, 672],
        40,
        "imagenet80",
    )
    assert "logit_bias" not in segment  # segment does not read it: no dead key
    assert _compose("extract_features")["bounds"] == [2048, 672]
    assert _compose("demo")["bounds"] == [448, 336]
    assert _compose("demo")["teacher"]["batch_size"] == 16


def test_a_command_setting_a_teacher_value_keeps_it():
    """speed.yaml's teacher.batch_size (64) is not overwritten by the teacher's default (it was,
    while speed.yaml's own values came before the teacher group)."""
    assert _compose("speed")["teacher"]["batch_size"] == 64
    assert _compose("speed", ["teacher.batch_size=8"])["teacher"]["batch_size"] == 8


def test_dataset_nodes_take_the_protocol_and_set_only_what_differs():
    for name in ("ade20k", "coco_object", "coco_stuff", "context59", "voc20"):
        dataset = _compose("eval", [f"dataset={name}"])["dataset"]
        protocol = {k: dataset[k] for k in ("bounds", "logit_scale", "logit_bias")}
        assert protocol == {"bounds": [2048, 672], "logit_scale": 40, "logit_bias": 0}, name
        assert (dataset["prob_threshold"], dataset["area_threshold"]) == (None, None), name
    assert _compose("eval", ["dataset=cityscapes"])["dataset"]["bounds"] == [2048, 1024]
    context60 = _compose("eval", ["dataset=context60"])["dataset"]
    assert (context60["logit_scale"], context60["prob_threshold"]) == (50, 0.1)

    def voc21(backbone: str) -> dict:
        with initialize_config_module("spar.configs", version_base="1.3"):
            cfg = compose("eval", ["dataset=voc21", f"backbone={backbone}"])
        return OmegaConf.to_container(cfg.dataset, resolve=True)

    assert voc21("tiny")["logit_scale"] == 65
    assert (voc21("maskclip")["prob_threshold"], voc21("maskclip")["area_threshold"]) == (
        0.1,
        0.1,
    )
    assert (voc21("siglip2")["prob_threshold"], voc21("siglip2")["area_threshold"]) == (
        None,
        None,
    )


# Which dataclass types which node of a YAML file: by folder (the file's root node), and for the
# commands and the train_images presets (global package) by top-level key.
_FILE_SCHEMAS = {
    "teacher": TeacherSettings,
    "refine": LPOSSSettings,
    "upsample": AnyUpSettings,
    "dataset": BenchmarkSettings,
}
_TOP_LEVEL = {
    "teacher": TeacherSettings,
    "optim": OptimSettings,
    "trainer": TrainerSettings,
    "dataset": BenchmarkSettings,
    "refine": LPOSSSettings,
    "upsample": AnyUpSettings,
}


def _repeats(node: dict, schema: type, where: str) -> list[str]:
    """``where.key = value`` (``where key`` at a file's top level) for every value of ``node``
    equal to ``schema``'s default."""
    found = []
    fields = {field.name: field for field in dataclasses.fields(schema)}
    defaults = _defaults(schema)
    for key, value in node.items():
        if key not in fields:
            continue
        default = defaults[key]
        if isinstance(value, dict) and isinstance(default, dict):
            nested = fields[key].default_factory()
            found += _repeats(value, type(nested), f"{where}.{key}")
        elif default is not MISSING and value == default and type(value) is not dict:
            sep = " " if where.endswith(":") else "."
            found.append(f"{where}{sep}{key} = {value!r}")
    return found


def _yaml_files() -> list[Path]:
    return sorted(
        p for p in CONFIG_DIR.rglob("*.yaml") if "hydra" not in p.relative_to(CONFIG_DIR).parts
    )


def test_no_yaml_file_repeats_a_dataclass_default():
    repeats = []
    for path in _yaml_files():
        node = yaml.safe_load(path.read_text()) or {}
        node = {k: v for k, v in node.items() if k not in ("defaults", "hydra")}
        relative = path.relative_to(CONFIG_DIR)
        folder = relative.parts[0] if len(relative.parts) > 1 else None
        if folder in _FILE_SCHEMAS:
            repeats += _repeats(node, _FILE_SCHEMAS[folder], str(relative))
            continue
        for key, schema in _TOP_LEVEL.items():
            if isinstance(node.get(key), dict):
                repeats += _repeats(node[key], schema, f"{relative}: {key}")
        repeats += _repeats(node, EvalProtocol, f"{relative}:")
    assert not repeats, "YAML values equal to their dataclass default: " + "; ".join(repeats)


def test_the_repeat_check_finds_a_repeat(tmp_path):
    """The walk above is not blind: a node that writes a default is reported."""
    written = {"stride": 24, "batch_size": 16, "affinity": {"model": "vit_base_patch16_224.dino"}}
    assert _repeats(written, TeacherSettings, "t") == ["t.stride = 24"]
    assert _repeats({"affinity": written["affinity"], "k": 400}, LPOSSSettings, "r") == [
        "r.affinity.model = 'vit_base_patch16_224.dino'",
        "r.k = 400",
    ]


def test_every_schema_is_registered_and_named_by_a_yaml_file():
    named = "\n".join(path.read_text() for path in _yaml_files())
    for name in SCHEMAS:
        assert f"/schema/{name}@" in named, name
    assert set(SCHEMAS.values()) == {
        TeacherSettings,
        OptimSettings,
        TrainerSettings,
        LPOSSSettings,
        AnyUpSettings,
        BenchmarkSettings,
    }
    assert _defaults(AffinitySettings)["weights"] == "hub"


@pytest.mark.parametrize(
    ("name", "override", "key", "expected"),
    [
        ("train", "teacher.stride=[24,32]", "teacher.stride", [24, 32]),
        ("train", "teacher.stride=32", "teacher.stride", 32),
        ("train", "teacher.window=96", "teacher.window", 96),
        ("eval", "teacher.window=[224,448]", "teacher.window", [224, 448]),
        ("train", "teacher.compile=reduce-overhead", "teacher.compile", "reduce-overhead"),
        ("train", "teacher.compile=true", "teacher.compile", True),
        ("train", "teacher.cache=false", "teacher.cache", False),
        ("train", "optim.betas=[0.9,0.99]", "optim.betas", [0.9, 0.99]),
        ("train", "optim.lr=1e-3", "optim.lr", 1e-3),
        ("train", "optim.schedule=cosine", "optim.schedule", "cosine"),
        ("train", "trainer.grad_clip=1.0", "trainer.grad_clip", 1.0),
        ("train", "trainer.grad_clip=0.5", "trainer.grad_clip", 0.5),
        ("train", "trainer.grad_clip=null", "trainer.grad_clip", None),
        ("train", "trainer.stop_after_steps=3", "trainer.stop_after_steps", 3),
        ("train", "trainer.precision=bf16", "trainer.precision", "bf16"),
        ("eval", "dataset.bounds=null", "dataset.bounds", None),
        ("eval", "dataset.bounds=[128,96]", "dataset.bounds", [128, 96]),
        ("eval", "dataset.prob_threshold=0.2", "dataset.prob_threshold", 0.2),
        ("eval", "dataset.class_names=names.txt", "dataset.class_names", "names.txt"),
        ("eval", "templates=single", "templates", "single"),
        ("segment", "bounds=null", "bounds", None),
        ("segment", "logit_scale=50", "logit_scale", 50),
        ("segment", "area_threshold=0.05", "area_threshold", 0.05),
        ("extract_features", "bounds=[448,336]", "bounds", [448, 336]),
    ],
)
def test_the_overrides_users_pass_still_compose(name, override, key, expected):
    value = _compose(name, [override])
    for part in key.split("."):
        value = value[part]
    assert value == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["refine=lposs", "refine.short_side=null"], {"refine.short_side": None}),
        (
            ["refine=lposs_plus", "refine.lab_scale=[100,128,128]", "refine.neighbourhood=5"],
            {"refine.lab_scale": [100, 128, 128], "refine.neighbourhood": 5},
        ),
        (
            ["refine=lposs", "refine.affinity.weights=null", "refine.affinity.options={depth:1}"],
            {"refine.affinity.weights": None, "refine.affinity.options": {"depth": 1}},
        ),
        (
            ["refine=lposs", "refine.affinity.model=vit_tiny_patch16_224", "refine.window=48"],
            {"refine.affinity.model": "vit_tiny_patch16_224", "refine.window": 48},
        ),
        (
            ["upsample=anyup", "upsample.weights=null", "upsample.chunk_size=4096"],
            {"upsample.weights": None, "upsample.chunk_size": 4096},
        ),
        (
            ["upsample=anyup", "upsample.weights=/tmp/anyup.pth", "upsample.precision=fp32"],
            {"upsample.weights": "/tmp/anyup.pth", "upsample.precision": "fp32"},
        ),
    ],
)
def test_the_stage_overrides_still_compose(overrides, expected):
    composed = _compose("eval", overrides)
    for key, value in expected.items():
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_wrong_values_compose_and_spar_checks_name_them():
    """Loose types leave the error to spar's checks, one line naming key and value."""
    with initialize_config_module("spar.configs", version_base="1.3"):
        cfg = compose("eval", ["teacher.stride=abc"])
    with pytest.raises(SettingError, match="teacher.stride"):
        check_teacher_settings(OmegaConf.to_container(cfg.teacher), "tiny")
    train = _compose("train", ["optim.betas=[0.9,2]", "trainer.grad_clip=-1"])
    train["teacher"]["cache_dir"] = "cache"
    with pytest.raises(SettingError, match="optim.betas"):
        check_training_config(train)


def test_typed_fields_refuse_a_value_of_another_type():
    """An int field (``trainer.epochs``) refuses text at composition, naming the key."""
    with pytest.raises(Exception, match="trainer.epochs"):
        _compose("train", ["trainer.epochs=ten"])
