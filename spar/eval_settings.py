"""The settings of an evaluation, checked once where a config or a notebook dict enters the
library (:func:`spar.evaluation.run_evaluation`) and passed down as a typed, frozen
:class:`EvalSettings`.

:meth:`EvalSettings.from_config` runs every check before any long work (renamed keys, the
feature source, the refine/upsample stages, the dataset, teacher, precision and speed settings,
the ``compile`` target); errors name the key and the value. The resolved dict is kept only as
:attr:`EvalSettings.record`: what the run records (``eval_results.json``'s ``config``) and
fingerprints (:func:`spar.eval_fingerprint.evaluation_settings`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .class_names import load_class_names
from .config import (
    RENAMED_SETTINGS,
    SettingError,
    check_renamed,
    require,
    require_bool,
    require_int,
)
from .data.benchmarks import BENCHMARKS
from .imaging import DEFAULT_MAX_IMAGE_PIXELS
from .models.compiling import check_compile_target
from .models.teacher_config import check_feature_source, check_teacher_settings
from .protocol import PROTOCOL
from .refine import check_stage_settings
from .utils import PRECISIONS

__all__ = ["DatasetSettings", "EvalSettings", "check_eval_settings", "dataset_classes"]


@dataclass(frozen=True)
class DatasetSettings:
    """The checked ``dataset`` node of an evaluation (see
    :class:`spar.protocol.BenchmarkSettings` for the meaning of each field).

    Attributes:
        classes: the synonym lists of the benchmark's classes, read from ``class_names`` (or
            the benchmark's own file) once, when the settings were checked.
        class_file: the class-name file they were read from.
    """

    name: str
    root: str
    split: str | None
    class_names: str | None
    bounds: tuple[int, int]
    logit_scale: float
    logit_bias: float
    prob_threshold: float | None
    area_threshold: float | None
    classes: tuple[tuple[str, ...], ...]
    class_file: str


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`spar.evaluation.run_evaluation` reads, checked (:meth:`from_config`).

    Attributes:
        features: ``student`` (one pass of the backbone) | ``teacher`` (sliding windows).
        backbone: the ``create_backbone`` arguments (a copy of the config's node).
        checkpoint: a student checkpoint to load, or ``None``.
        teacher: the ``configs/teacher`` node (read with ``features=teacher``), or ``None``.
        refine, upsample: the stage nodes (:func:`spar.refine.build_refiner` /
            :func:`~spar.refine.build_upsampler`), or ``None``.
        dataset: the benchmark and its protocol.
        templates: the prompt-template set.
        device, precision: where and in which precision the models run.
        num_workers, show_progress, save_predictions: loader workers, progress bar, whether
            each prediction is written as a PNG.
        compile: the student's ``torch.compile`` setting.
        max_image_pixels: the decompression-bomb limit for the images read.
        record: the resolved config as given (recorded in ``eval_results.json`` and
            fingerprinted); not read to run the evaluation.
    """

    features: str
    backbone: dict[str, Any]
    checkpoint: str | None
    teacher: dict[str, Any] | None
    refine: dict[str, Any] | None
    upsample: dict[str, Any] | None
    dataset: DatasetSettings
    templates: str
    device: str
    precision: str
    num_workers: int
    show_progress: bool
    save_predictions: bool
    compile: Any
    max_image_pixels: int | None
    record: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Any, where: str = "run_evaluation") -> EvalSettings:
        """Check an eval config (a Hydra ``DictConfig`` or a plain dict, e.g. from a notebook)
        once and type it; raises the one-line error of the first bad key."""
        config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        check_renamed(config, RENAMED_SETTINGS["eval"], where)
        check_feature_source(config["features"])
        check_stage_settings(config.get("refine"), config.get("upsample"))
        classes = check_eval_settings(config)
        data = config["dataset"]
        compile_setting = check_compile_target(config.get("compile", False), config["features"])
        return cls(
            features=config["features"],
            backbone=copy.deepcopy(dict(config["backbone"])),
            checkpoint=config.get("checkpoint"),
            teacher=copy.deepcopy(config.get("teacher")),
            refine=copy.deepcopy(config.get("refine")),
            upsample=copy.deepcopy(config.get("upsample")),
            dataset=DatasetSettings(
                name=data["name"],
                root=data["root"],
                split=data.get("split"),
                class_names=data.get("class_names"),
                bounds=tuple(data["bounds"]),
                logit_scale=data["logit_scale"],
                logit_bias=data.get("logit_bias", PROTOCOL.logit_bias),
                prob_threshold=data.get("prob_threshold"),
                area_threshold=data.get("area_threshold"),
                classes=tuple(tuple(synonyms) for synonyms in classes),
                class_file=str(data.get("class_names") or BENCHMARKS[data["name"]].class_file),
            ),
            templates=config.get("templates", PROTOCOL.templates),
            device=config.get("device", "auto"),
            precision=config.get("precision", "auto"),
            num_workers=config.get("num_workers", 0),
            show_progress=config.get("show_progress", True),
            save_predictions=bool(config.get("save_predictions")),
            compile=compile_setting,
            max_image_pixels=config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            record=config,
        )


def check_eval_settings(config: dict[str, Any]) -> list[list[str]]:
    """Check the values ``run_evaluation`` reads besides the model and the stages, before any
    long work; errors (:class:`~spar.config.SettingError`) name the key and the value. Returns
    the class names (:func:`dataset_classes`).

    Among them the class names: ``dataset.name`` is a known benchmark, and its class-name file
    (``dataset.class_names``, default the benchmark's own) reads and holds one class per class
    of the benchmark, so that a wrong file fails before the dataset is scanned, the backbone
    built and the names encoded."""
    classes = dataset_classes(config["dataset"])
    if config.get("features") == "teacher":
        check_teacher_settings(config.get("teacher"), config["backbone"]["name"])
    bounds = config["dataset"].get("bounds")
    require(
        isinstance(bounds, list | tuple)
        and len(bounds) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds),
        "dataset.bounds",
        bounds,
        "a [long, short] pair of positive integers",
    )
    precision = config.get("precision", "auto")
    require(precision in PRECISIONS, "precision", precision, f"one of {PRECISIONS}")
    require_int("num_workers", config.get("num_workers", 0), 0)
    require_int("max_image_pixels", config.get("max_image_pixels"), 1, optional=True)
    require_bool("save_predictions", config.get("save_predictions", False))
    return classes


def dataset_classes(data_cfg: Any) -> list[list[str]]:
    """The synonym lists of the classes of ``data_cfg`` (the ``dataset`` config, or a checked
    :class:`DatasetSettings`): its ``class_names`` file, or the benchmark's own file when that is
    null.

    Raises :class:`~spar.config.SettingError` for an unknown ``name``, or a file whose number of
    classes differs from the benchmark's, naming the file and both counts;
    :class:`~spar.class_names.ClassNameError` for a file that cannot be used (empty, not UTF-8,
    a name given twice).
    """
    if isinstance(data_cfg, DatasetSettings):
        return [list(synonyms) for synonyms in data_cfg.classes]
    name = data_cfg.get("name")
    require(name in BENCHMARKS, "dataset.name", name, f"one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    given = data_cfg.get("class_names")
    require(
        given is None or isinstance(given, str | Path),
        "dataset.class_names",
        given,
        "the path of a class-name file (one class per line) or null",
    )
    path = given or spec.class_file
    classes = load_class_names(path)
    if len(classes) != spec.num_classes:
        raise SettingError(
            f"dataset.class_names: {path} holds {len(classes)} classes, but {name} has "
            f"{spec.num_classes} (one class per line, synonyms comma-separated on it)"
        )
    return classes
