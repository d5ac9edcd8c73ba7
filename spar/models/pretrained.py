"""Shareable students: a distilled backbone as a folder, the layout Hugging Face hub users expect.

``save_pretrained(backbone, folder, summary=...)`` writes

- ``model.safetensors``: the whole model's ``state_dict`` (float tensors as they are), so the
  folder loads offline without the base weights;
- ``config.json``: the format tag, the backbone's registry name and options, the weights it was
  distilled from, the trained vision blocks, and the training summary (``train_summary.json``);
- ``README.md``: a model card with the held-out teacher-student agreement of the summary;
- ``manifest.json``: the content digest of ``model.safetensors`` and ``config.json`` (the files
  the model is loaded from; the card may be edited) and a fingerprint (the weights' content
  digest, :func:`spar.provenance.tensors_digest`, and the backbone name and options).

The save is atomic for the whole folder: the files are written into a sibling folder
``.<name>.saving~<host>~<pid>~<random>``, which then takes the folder's place (the earlier folder
is renamed to ``.<name>.old~...`` and removed), so a killed save leaves the folder entirely old
or entirely new and never a temporary file inside it. A sibling left by a killed save is removed
by the next save (when its writer no longer runs) and reported by :func:`from_pretrained`.

``from_pretrained(folder or "org/name")`` builds the registered backbone without weights and
loads ``model.safetensors`` strictly (read by :func:`~spar.models.weights.read_weight_file`, no
code runs), after checking the folder's files against ``manifest.json``. A hub id is resolved
through ``huggingface_hub``'s cache (downloaded once, then offline with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..io import _host, _writer_alive, atomic_path, atomic_write_bytes, atomic_write_json
from ..provenance import ProvenanceError, check_fingerprint, file_digest, tensors_digest
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
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "spar-pretrained-manifest-v1"
#: The files a student is loaded from: their digests are in the manifest and checked on load.
CHECKED_FILES = (WEIGHTS_NAME, CONFIG_NAME)
SAVED_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, MANIFEST_NAME)
#: Sibling folders of an interrupted save: ``.<name>.saving~<host>~<pid>~<hex>`` (being written)
#: and ``.<name>.old~<host>~<pid>~<hex>`` (the earlier save, renamed away before its removal).
_SIBLING_KINDS = ("saving", "old")
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
    """Write a student to ``folder``: ``model.safetensors``, ``config.json``, ``README.md`` and
    ``manifest.json``, replacing the whole folder at once (see the module docstring).

    Args:
        backbone: a backbone made by :func:`~spar.models.create_backbone` (its ``identity``
            names the registry entry), e.g. ``create_backbone(name, checkpoint=best)``.
        folder: created if missing; an earlier save there is replaced as a whole. A folder
            holding anything else is refused (it would be removed with the earlier save).
        summary: the training summary (``train_summary.json`` or its dict); its held-out
            numbers go into the model card.

    Raises:
        ValueError: the backbone has no registry identity.
        NonFiniteError: a tensor holds NaN or inf; nothing is written.
        FileExistsError: ``folder`` is a file, or holds files save_pretrained does not write.
    """
    identity = getattr(backbone, "identity", None) or {}
    if identity.get("name") is None:
        raise ValueError(
            "save_pretrained needs a backbone made by create_backbone (it records the registry "
            "name the folder is loaded with)"
        )
    folder = Path(folder)
    target = _check_target(folder)
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
    remove_interrupted_saves(target)
    staging = _sibling(target, "saving")
    try:
        staging.mkdir()
        with atomic_path(staging / WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": PRETRAINED_FORMAT})
        atomic_write_json(staging / CONFIG_NAME, config)
        atomic_write_bytes(staging / CARD_NAME, model_card(config).encode())
        manifest = {
            "format": MANIFEST_FORMAT,
            "files": {name: file_digest(staging / name) for name in CHECKED_FILES},
            "fingerprint": pretrained_fingerprint(config, tensors_digest(state)),
        }
        atomic_write_json(staging / MANIFEST_NAME, manifest)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def pretrained_fingerprint(config: Mapping[str, Any], weights: str) -> dict[str, Any]:
    """What a saved student is: the content digest of its weights (``weights``, a
    :func:`spar.provenance.tensors_digest`), its backbone name and options and trained blocks."""
    return {
        "weights": weights,
        "backbone": config["backbone"],
        "options": dict(config.get("options") or {}),
        "trainable_blocks": list(config.get("trainable_blocks") or []),
    }


def _check_target(folder: Path) -> Path:
    """The real path of ``folder`` (a symlink is followed: the folder it names is replaced),
    refused when it is a file or holds anything save_pretrained does not write."""
    target = folder.resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot save a student to {folder}: it is a file")
    if target.is_dir():
        others = sorted(p.name for p in target.iterdir() if p.name not in SAVED_FILES)
        if others:
            raise FileExistsError(
                f"cannot save a student to {folder}: it holds other files ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}), which replacing the folder would remove; "
                "save into a new folder"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}~{_host()}~{os.getpid()}~{secrets.token_hex(4)}")


def interrupted_saves(folder: str | Path) -> list[Path]:
    """The sibling folders an interrupted save of ``folder`` left (``.saving~`` and ``.old~``),
    including those of saves still running."""
    target = Path(folder).resolve()
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}\.(?:{'|'.join(_SIBLING_KINDS)})~[^~/]+~\d+~[0-9a-f]+$"
    )
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.match(p.name))


def remove_interrupted_saves(folder: str | Path) -> list[Path]:
    """Remove the siblings of ``folder`` left by saves whose process no longer runs on this host
    (a sibling of another host is kept: its writer cannot be checked); returns them."""
    removed = []
    for sibling in interrupted_saves(folder):
        if _writer_alive(sibling.name) is False:
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    if removed:
        warnings.warn(
            f"removed what an interrupted save_pretrained left beside {folder}: "
            f"{', '.join(p.name for p in removed)}",
            stacklevel=3,
        )
    return removed


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in ``target``'s place: the earlier folder is renamed
    away, ``staging`` renamed in, then the earlier one removed. A kill leaves ``target`` entirely
    old or entirely new (or, between the two renames, missing, with both siblings beside it)."""
    _fsync_folder(staging)
    old = None
    if target.is_dir():
        old = _sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:  # e.g. a permission error: the earlier folder goes back
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    leftovers = interrupted_saves(path) if not is_hub_id(str(source)) else []
    if leftovers:
        raise FileNotFoundError(
            f"no student folder {path}: a save_pretrained into it was interrupted and left "
            f"{', '.join(p.name for p in leftovers)} beside it (.saving~: the new save, complete "
            "only if it holds manifest.json; .old~: the earlier one); save again, or rename one "
            "of them to the folder"
        )
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
            allow_patterns=list(SAVED_FILES),
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
        WeightLoadingError: a file does not match ``manifest.json`` (named: the folder was
            changed after the save), the weights do not fit the backbone (keys and shapes
            listed), or a tensor holds NaN or inf or is not floating where the model's is
            (named).
    """
    folder = resolve_pretrained_folder(source, revision, cache_dir)
    config = read_pretrained_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the folder {folder} holds no weights")
    check_manifest(folder, config)
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


def check_manifest(folder: str | Path, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check ``folder``'s files against its ``manifest.json``; returns the manifest.

    Every file the manifest lists must have the recorded content digest, and ``config.json``'s
    backbone name, options and trained blocks must be the fingerprint's. A folder without a
    manifest (saved before it existed) is accepted with a warning; siblings left by an
    interrupted save are reported with a warning.

    Raises:
        WeightLoadingError: one line naming the file that differs (or the manifest, when it
            cannot be read).
    """
    folder = Path(folder)
    leftovers = interrupted_saves(folder)
    if leftovers:
        warnings.warn(
            f"{folder} is a complete save, but an interrupted save_pretrained left "
            f"{', '.join(p.name for p in leftovers)} beside it (the next save removes them)",
            stacklevel=3,
        )
    path = folder / MANIFEST_NAME
    if not path.is_file():
        warnings.warn(
            f"{folder} has no {MANIFEST_NAME} (saved by an older spar): its files are not checked",
            stacklevel=3,
        )
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, fingerprint = dict(manifest["files"]), dict(manifest["fingerprint"])
    except (ValueError, KeyError, TypeError) as error:
        raise WeightLoadingError(f"cannot read {path}: {error}") from error
    for name, recorded in files.items():
        file = folder / name
        if not file.is_file():
            raise WeightLoadingError(f"{file} is missing but listed in {path}")
        if file_digest(file) != recorded:
            raise WeightLoadingError(
                f"{file} does not match {path} (content digest {file_digest(file)[:12]}, "
                f"recorded {str(recorded)[:12]}): the folder was changed after save_pretrained; "
                "save it again"
            )
    if config is not None:
        current = pretrained_fingerprint(config, fingerprint.get("weights"))
        try:
            check_fingerprint(fingerprint, current, str(folder / CONFIG_NAME))
        except ProvenanceError as error:
            raise WeightLoadingError(str(error)) from None
    return manifest
