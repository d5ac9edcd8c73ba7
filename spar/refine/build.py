"""The refinement stages from configuration (``configs/refine``, ``configs/upsample``).

``refine``: ``{name: none | lposs | lposs_plus, ...}``, the fields of
:class:`~spar.refine.lposs.LPOSSSettings`. ``upsample``: ``{name: bilinear | anyup, ...}``,
the fields of :class:`~spar.refine.anyup.AnyUpSettings`. Those dataclasses hold the defaults
(a missing key takes its default). ``weights`` is ``hub`` (the published weights, downloaded
once into the hub cache), a local file, read by :func:`spar.models.weights.read_weight_file`
(no code runs; NaN, inf or non-floating weights are refused), or ``null`` (random weights: for
timing the stages, never for results). ``affinity.options`` may not name a file for timm to read
(``checkpoint_path``, a ``file`` in ``pretrained_cfg``/``pretrained_cfg_overlay``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.weights import load_state_dict_strict, read_state_dict
from .anyup import HUB, RELEASE_URL, AnyUp, AnyUpSettings
from .lposs import LPOSS, LPOSS_OPTIONS, AffinityBackbone, AffinitySettings
from .upsample import AnyUpUpsampler

#: The ``refine.name`` values (``spar/configs/refine``): no refinement, LPOSS, LPOSS+.
REFINE_NAMES = ("none", "lposs", "lposs_plus")
#: The ``upsample.name`` values (``spar/configs/upsample``): bilinear, AnyUp.
UPSAMPLE_NAMES = ("bilinear", "anyup")
_ANYUP_SETTINGS = tuple(field.name for field in dataclasses.fields(AnyUpSettings))


def _name(settings: Mapping[str, Any] | None, key: str, names: tuple[str, ...]) -> str:
    name = (settings or {}).get("name", names[0])
    if name not in names:
        raise ValueError(f"unknown {key}.name {name!r}; use one of {', '.join(names)}")
    return name


def _local_weights(value: Any, key: str) -> Path | None:
    """The local weight file named by setting ``key`` (``None`` for ``hub`` or random weights);
    a clear error naming the file and the key when it does not exist."""
    if value in (None, HUB):
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"refinement weights not found: {path} (config key {key}); give an existing file or "
            f"{key}={HUB} to download the published weights"
        )
    return path


#: timm options that would make ``timm.create_model`` read a weight file itself, bypassing
#: spar's reader (:func:`spar.models.weights.read_state_dict`).
_TIMM_FILE_OPTIONS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def check_timm_options(options: Mapping[str, Any] | None, key: str) -> None:
    """Refuse timm options that name a weight file (``checkpoint_path``, or a ``file`` in
    ``pretrained_cfg``/``pretrained_cfg_overlay``): that file would be read by timm, not by
    spar's reader, so it must be given as ``refine.affinity.weights`` instead.

    Raises:
        ValueError: one line naming the option and the setting to use.
    """
    for name in _TIMM_FILE_OPTIONS:
        value = (options or {}).get(name)
        names_file = isinstance(value, Mapping) and value.get("file") is not None
        if value is not None and (name == "checkpoint_path" or names_file):
            raise ValueError(
                f"{key}.{name} names a weight file that timm would read past spar's reader; "
                "give the file as refine.affinity.weights instead"
            )


def check_stage_settings(
    refine: Mapping[str, Any] | None, upsample: Mapping[str, Any] | None
) -> None:
    """Validate the stage names and that every local weight file exists, before any long work.

    Raises:
        ValueError: an unknown stage name or setting.
        FileNotFoundError: a weight file is missing (the message names it and its config key).
    """
    if _name(refine, "refine", REFINE_NAMES) != "none":
        unknown = sorted(set(refine) - {"name", "affinity", *LPOSS_OPTIONS})
        if unknown:
            raise ValueError(f"unknown refine setting(s) {', '.join(unknown)}")
        affinity = refine.get("affinity", {})
        check_timm_options(affinity.get("options"), "refine.affinity.options")
        _local_weights(affinity.get("weights"), "refine.affinity.weights")
    if _name(upsample, "upsample", UPSAMPLE_NAMES) == "anyup":
        unknown = sorted(set(upsample) - set(_ANYUP_SETTINGS))
        if unknown:
            raise ValueError(f"unknown upsample setting(s) {', '.join(unknown)}")
        _local_weights(upsample.get("weights"), "upsample.weights")


def _hub_weights(fetch: Callable[[], Path], key: str) -> Path:
    """``fetch()`` of published weights; a failed download (no network, an offline machine
    without them in its cache) is an error naming the config key and the way around it."""
    try:
        return fetch()
    except OSError as error:
        raise FileNotFoundError(
            f"{key}={HUB}: the published weights could not be fetched ({error}); download them "
            f"where the network is reachable, or set {key} to a local file"
        ) from error


def _hub_file_for_timm(model: nn.Module) -> Path:
    """The published weights of a timm model, from the Hugging Face hub cache."""
    from huggingface_hub import hf_hub_download

    repo = model.pretrained_cfg.get("hf_hub_id")
    if not repo:
        raise ValueError(
            "this timm model has no hub weights; set refine.affinity.weights to a file"
        )
    return Path(hf_hub_download(repo, "model.safetensors"))


def _hub_file_for_url(url: str) -> Path:
    """``url`` downloaded once into torch's hub cache (``<hub dir>/checkpoints``)."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=True)
    return target


def build_affinity_backbone(settings: Mapping[str, Any]) -> AffinityBackbone:
    """``{model: timm name, weights: hub | file, options: timm kwargs}`` -> the backbone."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    weights = settings.get("weights", AffinitySettings.weights)
    check_timm_options(settings.get("options"), "refine.affinity.options")
    path = _local_weights(weights, "refine.affinity.weights")
    model = timm.create_model(
        settings["model"],
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        **dict(settings.get("options") or {}),
    )
    if weights is None:
        return AffinityBackbone(model)  # random weights (timing only)
    key = "refine.affinity.weights"
    path = path or _hub_weights(lambda: _hub_file_for_timm(model), key)
    state = read_state_dict(path)
    if set(state) != set(model.state_dict()):
        state = checkpoint_filter_fn(state, model)  # e.g. the original DINO key layout
    load_state_dict_strict(model, state, f"{path} (refine.affinity.weights)")
    return AffinityBackbone(model)


def build_refiner(
    settings: Mapping[str, Any] | None, device: torch.device | str = "cpu"
) -> LPOSS | None:
    """The ``refine`` stage on ``device`` (``None`` for ``none``)."""
    name = _name(settings, "refine", REFINE_NAMES)
    if name == "none":
        return None
    check_stage_settings(settings, None)
    options = {key: settings[key] for key in LPOSS_OPTIONS if key in settings}
    affinity = build_affinity_backbone(settings.get("affinity") or vars(AffinitySettings()))
    return LPOSS(affinity, pixel_refine=name == "lposs_plus", **options).to(device)


def load_anyup(
    weights: str | Path | None = AnyUpSettings.weights,
    chunk_size: int = AnyUpSettings.chunk_size,
) -> AnyUp:
    """AnyUp with the released multi-backbone weights (``hub``) or a local file, loaded
    strictly (``None``: random weights, for timing only)."""
    model = AnyUp(chunk_size=chunk_size)
    if weights is None:
        return model
    key = "upsample.weights"
    path = _local_weights(weights, key) or _hub_weights(lambda: _hub_file_for_url(RELEASE_URL), key)
    load_state_dict_strict(model, read_state_dict(path), f"{path} (upsample.weights)")
    return model


def build_upsampler(
    settings: Mapping[str, Any] | None, device: torch.device | str = "cpu"
) -> AnyUpUpsampler | None:
    """The ``upsample`` stage on ``device`` (``None`` for ``bilinear``)."""
    if _name(settings, "upsample", UPSAMPLE_NAMES) == "bilinear":
        return None
    defaults = AnyUpSettings
    model = load_anyup(
        settings.get("weights", defaults.weights),
        settings.get("chunk_size", defaults.chunk_size),
    )
    return AnyUpUpsampler(model, settings.get("precision", defaults.precision)).to(device)


def build_stages(config: Mapping[str, Any], device: torch.device | str = "cpu") -> dict:
    """``{"refiner": ..., "upsampler": ...}`` for :class:`~spar.segmentation.OpenVocabSegmenter`
    from a config's ``refine`` and ``upsample`` sections (both optional)."""
    refine, upsample = config.get("refine"), config.get("upsample")
    check_stage_settings(refine, upsample)
    return {
        "refiner": build_refiner(refine, device),
        "upsampler": build_upsampler(upsample, device),
    }
