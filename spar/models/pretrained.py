"""Shareable students: a distilled backbone as a folder, the layout Hugging Face hub users expect.

``save_pretrained(backbone, folder, summary=...)`` writes

- ``model.safetensors``: the whole model's ``state_dict`` (float tensors as they are), so the
  folder loads offline without the base weights;
- ``config.json``: the format tag, the backbone's registry name and options, the weights it was
  distilled from, the trained vision blocks, and the training summary (``train_summary.json``);
- ``README.md``: a model card with the held-out teacher-student agreement of the summary.

``from_pretrained(folder or "org/name")`` builds the registered backbone without weights and
loads ``model.safetensors`` strictly (read by :func:`~spar.models.weights.read_weight_file`, no
code runs). A hub id is resolved through ``huggingface_hub``'s cache (downloaded once, then
offline with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path, atomic_write_bytes, atomic_write_json
from ..utils import check_finite_before_saving
from .registry import backbone_entry, create_backbone
from .weights import (
    HF_HUB_PREFIX,
    WeightLoadingError,
    is_hub_id,
    load_state_dict_strict,
    read_weight_file,
)

PRETRAINED_FORMAT = "spar-pretrained-v1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: Options naming files on the saving machine (base weights, a tokenizer vocabulary): not
#: needed to load the folder, which holds the whole model, so not saved (file names are noted).
LOCAL_FILE_OPTIONS = ("backbone_weights", "weights", "bpe_path")


def trained_blocks(backbone: nn.Module) -> list[int]:
    """Indices of the vision blocks that hold trainable parameters (the distilled ones)."""
    return [
        index
        for index, block in enumerate(backbone.blocks)
        if any(param.requires_grad for param in block.parameters())
    ]


def _read_summary(summary: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if summary is None:
        return {}
    if isinstance(summary, Mapping):
        return dict(summary)
    path = Path(summary)
    if not path.is_file():
        raise FileNotFoundError(f"training summary not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_card(config: Mapping[str, Any]) -> str:
    """The README.md of a saved student: what it is, how to load it, its held-out numbers."""
    name = config["backbone"]
    summary = config.get("training") or {}
    license_text = backbone_entry(name).config.license or "none recorded (random initialisation)"
    lines = [
        "---",
        "library_name: spar",
        "tags:",
        "- spar",
        "- open-vocabulary-semantic-segmentation",
        "- dense-features",
        "---",
        "",
        f"# SPAR student: `{name}`",
        "",
        f"A single-pass, any-resolution `{name}` backbone distilled by "
        "spar from its sliding-window teacher (MSE feature regression, "
        f"vision blocks {config['trainable_blocks']} trained, everything else frozen). "
        f"Distilled from the weights `{config['base_weights']}`; their licence: {license_text}.",
        "",
        "```python",
        "from spar.models import from_pretrained",
        "",
        'student = from_pretrained("path/to/this/folder")  # or a hub id "org/name"',
        "```",
        "",
        "## Held-out agreement with the teacher",
        "",
    ]
    sizes = summary.get("heldout_sizes") or {}
    if sizes:
        lines += [
            "Teacher-student MSE and mean per-cell cosine similarity on held-out images "
            "(never trained on), before and after distillation:",
            "",
            "| size | images | MSE before | MSE after | cosine before | cosine after |",
            "|---|---|---|---|---|---|",
        ]
        for size, row in sizes.items():
            lines.append(
                f"| {size} | {row.get('images', '-')} | {_number(row.get('mse_before'), 4)} | "
                f"{_number(row.get('mse_after'), 4)} | {_number(row.get('cos_before'), 4)} | "
                f"{_number(row.get('cos_after'), 4)} |"
            )
        lines += [
            "",
            f"Training: {summary.get('steps', '-')} steps, {summary.get('images_seen', '-')} "
            f"views seen, precision {summary.get('precision', '-')}.",
        ]
    else:
        lines.append("No training summary was saved with this student, so no held-out numbers.")
    lines += ["", f"`config.json` holds the whole training summary ({PRETRAINED_FORMAT}).", ""]
    return "\n".join(lines)


def save_pretrained(
    backbone: nn.Module,
    folder: str | Path,
    summary: Mapping[str, Any] | str | Path | None = None,
) -> Path:
    """Write a student to ``folder``: ``model.safetensors``, ``config.json``, ``README.md``.

    Args:
        backbone: a backbone made by :func:`~spar.models.create_backbone` (its ``identity``
            names the registry entry), e.g. ``create_backbone(name, checkpoint=best)``.
        folder: created if missing; files already there are replaced (each atomically).
        summary: the training summary (``train_summary.json`` or its dict); its held-out
            numbers go into the model card.

    Raises:
        ValueError: the backbone has no registry identity.
        NonFiniteError: a tensor holds NaN or inf; nothing is written.
    """
    identity = getattr(backbone, "identity", None) or {}
    if identity.get("name") is None:
        raise ValueError(
            "save_pretrained needs a backbone made by create_backbone (it records the registry "
            "name the folder is loaded with)"
        )
    folder = Path(folder)
    # Cloned: safetensors refuses tensors that share memory.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    check_finite_before_saving(state, str(folder / WEIGHTS_NAME))
    options = identity.get("options") or {}
    local_files = {k: Path(str(v)).name for k, v in options.items() if k in LOCAL_FILE_OPTIONS}
    config = {
        "format": PRETRAINED_FORMAT,
        "backbone": identity["name"],
        "options": {k: v for k, v in options.items() if k not in LOCAL_FILE_OPTIONS},
        "base_weights": identity.get("pretrained"),
        "base_files": local_files,
        "trainable_blocks": trained_blocks(backbone),
        "training": _read_summary(summary),
    }
    with atomic_path(folder / WEIGHTS_NAME) as temporary:
        save_file(state, str(temporary), metadata={"format": PRETRAINED_FORMAT})
    atomic_write_json(folder / CONFIG_NAME, config)
    atomic_write_bytes(folder / CARD_NAME, model_card(config).encode())
    return folder


def resolve_pretrained_folder(
    source: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local folder as it is; a hub id (``"org/name"`` or ``"hf-hub:org/name"``, see
    :func:`~spar.models.weights.is_hub_id`) through huggingface_hub's cache.

    Raises:
        FileNotFoundError: ``source`` is a local path (e.g. ``students/siglip2``, ``./x``,
            ``/abs/x``) that is not a folder; it is never looked up on the hub.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(str(source)):
        raise FileNotFoundError(
            f"no student folder {path} (a local path; a hub id is 'org/name' or "
            f"'{HF_HUB_PREFIX}org/name')"
        )
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=str(source).removeprefix(HF_HUB_PREFIX),
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME],
        )
    )


def read_pretrained_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a student folder, checked for its format and backbone name."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder of save_pretrained")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != PRETRAINED_FORMAT or "backbone" not in config:
        raise WeightLoadingError(
            f"{path}: format {config.get('format')!r}, expected {PRETRAINED_FORMAT!r} with a "
            "'backbone' entry"
        )
    return config


def from_pretrained(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> nn.Module:
    """Load a student written by :func:`save_pretrained`, in eval mode.

    Args:
        source: the folder, or a hub id ``"org/name"`` / ``"hf-hub:org/name"`` (``org`` must
            not be a local folder; see :func:`~spar.models.weights.is_hub_id`); ``revision``
            and ``cache_dir`` as in ``huggingface_hub.snapshot_download`` (with
            ``HF_HUB_OFFLINE=1`` only the cache).
        device: where to put it (default: the CPU).
        **options: backbone options that cannot be saved, e.g. ``tokenizer=`` for offline text
            encoding; they override the saved ones.

    Returns:
        The backbone, with the saved vision blocks trainable (for further distillation) and
        ``training_summary`` set to the saved summary.

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` / ``model.safetensors`` in it
            (the message names the file).
        WeightLoadingError: the weights do not fit the backbone (keys and shapes listed), or
            a tensor holds NaN or inf or is not floating where the model's is (named).
    """
    folder = resolve_pretrained_folder(source, revision, cache_dir)
    config = read_pretrained_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the folder {folder} holds no weights")
    state = read_weight_file(weights)
    backbone = create_backbone(
        config["backbone"],
        pretrained=None,
        trainable_blocks=config["trainable_blocks"],
        **{**config.get("options", {}), **options},
    )
    load_state_dict_strict(backbone, state, source=str(weights))
    backbone.identity = {**backbone.identity, "pretrained": config.get("base_weights")}
    backbone.training_summary = config.get("training", {})
    return backbone.to(device or "cpu").eval()
