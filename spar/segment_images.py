"""Segment an image or every image under a folder (recursively), with resumable outputs.

:func:`segment_path` is the one call for both (``spar-segment image=<folder>`` and notebooks).
For each image ``<folder>/a/x.jpg`` it writes, under ``out_dir``, beside each other and named by
the image's path relative to the folder with its whole file name kept (so ``a/x.jpg`` and
``b/x.jpg``, or ``x.jpg`` and ``x.png``, never collide):

- ``a/x.jpg.classes.png``: single-channel 8-bit class indices (value k = class k), at the
  image's own size (the forward pass sees it resized to ``bounds``; the class scores are
  resized back, as in evaluation);
- ``a/x.jpg.overlay.png``: the class colours over the image, with a legend
  (:func:`spar.viz.overlay`);
- ``a/x.jpg.json``: the share of the pixels of each class name, the image's sizes and timings.

Images of one size share a batch (``batch_size``). ``out_dir`` holds
:data:`FINGERPRINT_FILE`, the settings and weights (:mod:`spar.provenance`) the outputs were
made from: a rerun into it with the same ones skips the images whose three outputs exist (an
interrupted run resumes), one with others stops with :class:`ProvenanceError` naming each
differing key. An image changed since its outputs were written (size or mtime) is segmented
again. Unreadable images are skipped with a warning and counted.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .class_names import display_names, parse_classes
from .config import SettingError
from .data.images import image_size, list_images, load_image, prepare_images
from .evaluation import prediction_to_png
from .io import atomic_save_image, atomic_write_json, probe_writable
from .output_names import relative_name
from .protocol import PROTOCOL
from .provenance import (
    ProvenanceError,
    check_fingerprint,
    image_list_fingerprint,
    settings_fingerprint,
    weights_digest,
)
from .segmentation import OpenVocabSegmenter
from .timing import synchronize
from .utils import module_device
from .viz import overlay

#: The settings and weights the outputs of a folder were made from, in the output folder.
FINGERPRINT_FILE = "segmentation_fingerprint.json"
#: The three outputs of an image, as suffixes appended to its file name.
OUTPUT_SUFFIXES = {"classes": ".classes.png", "overlay": ".overlay.png", "info": ".json"}

Template = Callable[[str], str]


class OutputFolderError(SettingError):
    """The output folder cannot be created or written; the message names it and why."""


@dataclasses.dataclass
class SegmentSummary:
    """What :func:`segment_path` did.

    Attributes:
        written: images segmented now (their three outputs written).
        skipped: images whose outputs were already there (an earlier run's), not redone.
        unreadable: images that could not be read (skipped, named in ``unreadable_files``).
        unreadable_files: why each unreadable image was skipped (the message names it).
        out_dir: where the outputs are.
        seconds: wall-clock time of the call.
    """

    written: int
    skipped: int
    unreadable: int
    unreadable_files: list[str]
    out_dir: str
    seconds: float

    def describe(self) -> str:
        """``"3 written, 1 skipped (done before), 1 unreadable -> out/"``."""
        return (
            f"{self.written} written, {self.skipped} skipped (done before), "
            f"{self.unreadable} unreadable -> {self.out_dir}"
        )


def output_paths(image: Path, root: Path, out_dir: Path) -> dict[str, Path]:
    """``{"classes", "overlay", "info"}`` -> the outputs of ``image`` (a file under ``root``):
    ``out_dir/<relative path>.classes.png`` and so on, the file name kept whole."""
    name = relative_name(image, root)
    return {key: out_dir / f"{name}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def check_output_folder(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and check that a file can be written in it (a probe, removed).

    Raises:
        OutputFolderError: one line naming the folder and the reason (e.g. permission denied,
            a file in the way).
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(out_dir)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputFolderError(f"output folder {out_dir} cannot be written: {reason}") from None
    return out_dir


def images_under(path: str | Path, out_dir: str | Path | None = None) -> tuple[list[Path], Path]:
    """(images, root): every image under the folder ``path`` (recursive, sorted) and the folder,
    or ``([path], path.parent)`` for one image file. The PNGs this module wrote under
    ``out_dir`` (which may lie inside ``path``) are not images to segment.

    Raises ``FileNotFoundError`` naming ``path`` when it does not exist or holds no image."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    images = list_images(path)
    if out_dir is not None and path.is_dir():
        out_dir = Path(out_dir).resolve()
        ours = (OUTPUT_SUFFIXES["classes"], OUTPUT_SUFFIXES["overlay"])
        images = [
            image
            for image in images
            if not (image.name.endswith(ours) and image.resolve().is_relative_to(out_dir))
        ]
        if not images:
            raise FileNotFoundError(f"no images under {path} but the outputs in {out_dir}")
    return images, root


def _template_key(templates: str | Sequence[Template]) -> Any:
    """A template-set name, or the prompts of callables for the name ``{name}``: a stable
    fingerprint value either way."""
    if isinstance(templates, str):
        return templates
    return [template("{name}") for template in templates]


def _module_digest(module: Any) -> str | None:
    return weights_digest(module) if isinstance(module, nn.Module) else None


def segmentation_fingerprint(
    backbone: nn.Module,
    classes: Sequence[str | Sequence[str]],
    *,
    dense: nn.Module | None = None,
    bounds: Sequence[int] | None,
    templates: str | Sequence[Template],
    logit_scale: float,
    prob_threshold: float | None,
    area_threshold: float | None,
    refiner: nn.Module | None = None,
    upsampler: nn.Module | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dotted-key fingerprint (:func:`spar.provenance.settings_fingerprint`) of everything
    the outputs of :func:`segment_path` depend on: the class synonyms, templates, bounds, logit
    scale, thresholds, the content digest of the weights actually used (the dense source, the
    text encoder's backbone, the refine and upsample stages), the backbone's identity, and the
    caller's ``settings`` (e.g. the refine/upsample configs) under ``settings.``."""
    source = dense if dense is not None else backbone
    return settings_fingerprint(
        {
            "classes": parse_classes(classes),
            "templates": _template_key(templates),
            "bounds": None if bounds is None else list(bounds),
            "logit_scale": logit_scale,
            "prob_threshold": prob_threshold,
            "area_threshold": area_threshold,
            "backbone": getattr(backbone, "identity", None) or type(backbone).__name__,
            "source": type(source).__name__,
            "weights": {
                "backbone": _module_digest(backbone),
                "dense": None if dense is None else _module_digest(dense),
                "refiner": _module_digest(refiner),
                "upsampler": _module_digest(upsampler),
            },
            "settings": dict(settings or {}),
        }
    )


def _check_or_write_fingerprint(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Compare ``fingerprint`` with the one recorded in ``out_dir`` (write it when there is
    none); a folder with outputs but no fingerprint is refused too (their settings are
    unknown)."""
    path = out_dir / FINGERPRINT_FILE
    hint = "segment into another output folder, or remove this one"
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ProvenanceError(f"{path} cannot be read ({error}); {hint}") from None
        check_fingerprint(recorded, fingerprint, str(out_dir), hint=hint)
        return
    if any(out_dir.rglob(f"*{OUTPUT_SUFFIXES['classes']}")):
        raise ProvenanceError(
            f"{out_dir} holds segmentations but no {FINGERPRINT_FILE}: their settings are "
            f"unknown ({hint})"
        )
    atomic_write_json(path, fingerprint)


def _source_key(image: Path, root: Path) -> str:
    """The image as it is now (relative path, size, mtime), stored in its JSON."""
    return image_list_fingerprint([image], root)


def _is_done(image: Path, root: Path, paths: dict[str, Path]) -> bool:
    """All three outputs exist and the JSON was made from the image as it is now."""
    if not all(path.is_file() for path in paths.values()):
        return False
    try:
        info = json.loads(paths["info"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("source") == _source_key(image, root)


def _batches(sized: list[tuple[Path, tuple[int, int]]], batch_size: int) -> Iterator[list[Path]]:
    """Images grouped by their own (h, w) (so by their resized size too), in order of first
    appearance, ``batch_size`` at most per batch."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for image, size in sized:
        groups.setdefault(size, []).append(image)
    for images in groups.values():
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]


def class_shares(mask: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Fraction of the pixels of the (H, W) class-index ``mask`` won by each class, keyed by
    its display name, every class listed (in class order)."""
    counts = np.bincount(mask.reshape(-1), minlength=len(class_names))
    return {name: float(count) / mask.size for name, count in zip(class_names, counts, strict=True)}


def segment_path(
    backbone: nn.Module,
    path: str | Path,
    classes: Sequence[str | Sequence[str]],
    out_dir: str | Path,
    *,
    dense: nn.Module | None = None,
    bounds: Sequence[int] | None = PROTOCOL.bounds,
    templates: str | Sequence[Template] = PROTOCOL.templates,
    logit_scale: float = PROTOCOL.logit_scale,
    prob_threshold: float | None = PROTOCOL.prob_threshold,
    area_threshold: float | None = PROTOCOL.area_threshold,
    refiner: nn.Module | None = None,
    upsampler: nn.Module | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> SegmentSummary:
    """Segment the image file ``path``, or every image under the folder ``path``, into
    ``out_dir`` (the outputs: see the module docstring); resumes an earlier run into
    ``out_dir`` made with the same settings and weights.

    Args:
        backbone: a dense backbone (its single pass, unless ``dense``, and its text encoder).
        path: an image file or a folder (searched recursively, :func:`spar.data.list_images`).
        classes: class entries, each a name or synonyms (``"person, pedestrian"``); the first
            synonym names the class in the overlay and the shares.
        out_dir: where the outputs and the fingerprint go.
        dense: another dense source to segment with (e.g. a ``SlidingWindowTeacher``).
        bounds: (long, short) each image is resized to fit for the forward pass (``None``: its
            own size); the class scores are resized back to the image's own size, as the
            evaluation protocol does, so the class PNG and the overlay have the image's size.
        templates, logit_scale, prob_threshold, area_threshold, refiner, upsampler: as
            :class:`spar.segmentation.OpenVocabSegmenter`.
        batch_size: images of one size per forward, at most.
        show_progress: a tqdm bar (drawn only on a terminal).
        settings: anything else the outputs depend on that the arguments do not show (the
            command passes the refine/upsample configs and the backbone config); recorded in
            the fingerprint.

    Returns:
        :class:`SegmentSummary` (written, skipped, unreadable counts).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no image.
        OutputFolderError: ``out_dir`` cannot be written.
        ProvenanceError: ``out_dir`` holds outputs of other settings or weights.
        (All before any image is segmented.)
    """
    start = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    images, root = images_under(path, out_dir)
    out_dir = check_output_folder(out_dir)
    fingerprint = segmentation_fingerprint(
        backbone,
        classes,
        dense=dense,
        bounds=bounds,
        templates=templates,
        logit_scale=logit_scale,
        prob_threshold=prob_threshold,
        area_threshold=area_threshold,
        refiner=refiner,
        upsampler=upsampler,
        settings=settings,
    )
    _check_or_write_fingerprint(out_dir, fingerprint)

    unreadable: list[str] = []

    def skip(image: Path, error: Exception) -> None:
        why = str(error) if str(image) in str(error) else f"{image}: {error}"
        warnings.warn(f"skipping an unreadable image: {why}", stacklevel=2)
        unreadable.append(why)

    todo: list[tuple[Path, tuple[int, int]]] = []
    skipped = 0
    for image in images:
        if _is_done(image, root, output_paths(image, root, out_dir)):
            skipped += 1
            continue
        try:
            height, width = image_size(image)
        except (ValueError, OSError) as error:
            skip(image, error)
            continue
        todo.append((image, (height, width)))

    segmenter = OpenVocabSegmenter.from_backbone(
        backbone,
        classes,
        dense=dense,
        templates=templates,
        logit_scale=logit_scale,
        prob_threshold=prob_threshold,
        area_threshold=area_threshold,
        refiner=refiner,
        upsampler=upsampler,
    )
    names = display_names(segmenter.class_names)
    device = module_device(backbone)
    written = 0
    progress = tqdm(
        total=len(images),
        initial=skipped + len(unreadable),
        desc="segment",
        unit="img",
        disable=True if not show_progress else None,  # None: drawn on a terminal only
    )
    with progress:
        for batch in _batches(todo, batch_size):
            written += _segment_batch(
                segmenter, batch, root, out_dir, names, backbone, bounds, device, skip
            )
            progress.update(len(batch))
    return SegmentSummary(
        written=written,
        skipped=skipped,
        unreadable=len(unreadable),
        unreadable_files=unreadable,
        out_dir=str(out_dir),
        seconds=time.perf_counter() - start,
    )


def _segment_batch(
    segmenter: OpenVocabSegmenter,
    batch: list[Path],
    root: Path,
    out_dir: Path,
    names: list[str],
    backbone: nn.Module,
    bounds: Sequence[int] | None,
    device: torch.device,
    skip: Callable[[Path, Exception], None],
) -> int:
    """Segment one batch of same-size images and write their outputs; returns how many."""
    started = time.perf_counter()
    loaded = []
    for image in batch:
        try:
            loaded.append((image, load_image(image)))
        except (ValueError, OSError) as error:
            skip(image, error)
    if not loaded:
        return 0
    prepared = prepare_images(
        [pixels for _, pixels in loaded], backbone.mean, backbone.std, bounds, device
    )
    synchronize(device)
    forward_start = time.perf_counter()
    original = tuple(prepared.sizes[0])  # one size per batch (``_batches``)
    masks = segmenter.predict(prepared.inputs, output_size=original).cpu()  # (B, H, W)
    synchronize(device)
    forward = (time.perf_counter() - forward_start) / len(loaded)
    for index, (image, pixels) in enumerate(loaded):
        image_started = time.perf_counter()
        paths = output_paths(image, root, out_dir)
        mask = masks[index]
        atomic_save_image(paths["classes"], prediction_to_png(mask))
        atomic_save_image(paths["overlay"], overlay(pixels, mask, names))
        shared = (forward_start - started) / len(loaded) + forward
        info = {
            "image": relative_name(image, root),
            "source": _source_key(image, root),
            "classes": names,
            "shares": class_shares(mask.numpy(), names),
            "original_size": list(prepared.sizes[index]),
            "resized_size": list(prepared.inputs.shape[-2:]),
            "batch_images": len(loaded),
            "seconds": {
                "forward": forward,
                "total": shared + time.perf_counter() - image_started,
            },
        }
        atomic_write_json(paths["info"], info)
    return len(loaded)


__all__ = [
    "FINGERPRINT_FILE",
    "OUTPUT_SUFFIXES",
    "OutputFolderError",
    "SegmentSummary",
    "check_output_folder",
    "class_shares",
    "images_under",
    "output_paths",
    "segment_path",
    "segmentation_fingerprint",
]
