"""ONNX export of a student's dense forward, and of a class list's text embeddings.

:func:`export_onnx` writes one ONNX file of ``backbone(images)``: normalised (B, 3, H, W)
float32 images -> (B, C, ceil(H/p), ceil(W/p)) dense features, with batch, height and width
dynamic. Everything that depends on the image size is computed inside the graph from the
input's shape:

* fitting to the patch grid as the backbone's forward does: zero padding at the bottom/right
  (``tiny``/``maskclip``/``clip``, ``siglip2``, ``dinov3txt`` with ``patch_fit="pad"``) or the
  bicubic stretch of ``dinov3txt`` (``patch_fit="stretch"``), an ONNX ``Resize``;
* learned position embeddings: the bicubic resample as two interpolation matrices built from the
  grid size (:func:`spar.models.pos_embed.traced_bicubic_matrix`, float64);
* DINOv3 rotary embeddings: the patch-centre coordinates of the grid, then timm's angles from the
  stored periods.

The segmenter's own fitting (``patch_fit="truncate"`` of MaskCLIP, which crops the partial
patch row/column *before* the backbone) is not part of ``backbone(images)`` and so not of the
file: crop to multiples of the patch size before running it to get the paper's evaluation.

:func:`export_text_embeddings` writes the prompt-ensemble text embeddings of a class list
(:func:`spar.text_classifier.build_text_classifier`) to a safetensors file, so a deployment needs
no tokenizer or text tower.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .class_names import parse_classes
from .config import SettingError
from .io import atomic_path, probe_writable
from .models.base import DenseBackbone, check_images
from .protocol import PROTOCOL
from .text_classifier import Template, build_text_classifier
from .utils import module_device

INPUT_NAME = "images"
OUTPUT_NAME = "features"
DEFAULT_OPSET = 18
# The dense heads whose exported graph is checked against the torch forward.
EXPORTABLE_DENSE_HEADS = ("maskclip",)
# The largest side the exported graph accepts (a bound torch.export needs for its symbols).
MAX_SIDE = 16384
MAX_BATCH = 4096


class ExportError(SettingError):
    """A backbone, option or destination that cannot be exported; a one-line user error."""


def _backbone_kind(backbone: nn.Module) -> str:
    """The family of ``backbone`` as this module exports it; :class:`ExportError` otherwise."""
    from .models.dinov3txt import DinoV3TxtBackbone
    from .models.maskclip import MaskClipBackbone
    from .models.siglip2 import SigLIP2Backbone

    if isinstance(backbone, MaskClipBackbone):
        head = getattr(backbone, "dense_head", "maskclip")
        if head not in EXPORTABLE_DENSE_HEADS:
            raise ExportError(
                f"dense_head={head!r} cannot be exported to ONNX (supported: "
                f"{', '.join(EXPORTABLE_DENSE_HEADS)})"
            )
        return "maskclip"
    if isinstance(backbone, SigLIP2Backbone):
        return "siglip2"
    if isinstance(backbone, DinoV3TxtBackbone):
        trunk = backbone.model.visual_model.backbone
        if getattr(trunk, "rope_mixed", False):
            raise ExportError("DINOv3.txt trunks with mixed RoPE cannot be exported to ONNX")
        coords = getattr(trunk.rope, "normalize_coords", None)
        if coords not in ("separate", "min", "max"):
            raise ExportError("only DINOv3.txt trunks with centred RoPE grids can be exported")
        return "dinov3txt"
    raise ExportError(
        f"cannot export {type(backbone).__name__} to ONNX: supported are the maskclip/clip/tiny, "
        "siglip2 and dinov3txt families"
    )


def check_destination(path: str | Path, suffix: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` ending in ``suffix`` whose folder exists and is
    writable; :class:`ExportError` naming it otherwise (before any long work)."""
    path = Path(path)
    if path.suffix != suffix:
        raise ExportError(f"export path {path} must end in {suffix}")
    if path.is_dir():
        raise ExportError(f"export path {path} is a folder")
    folder = path.parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: folder {folder} does not exist")
    try:
        probe_writable(folder)
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise ExportError(f"cannot write {path}: {reason}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ExportError(f"cannot write {path}: permission denied")
    return path


def _rope_embed(rope: nn.Module, height, width) -> torch.Tensor:
    """(H * W, 4 dim/4) rotary embedding of a (height, width) grid (symbolic sizes allowed), what
    ``rope.get_embed(shape=(height, width))`` returns in eval mode: the grid's centred
    coordinates from tensor operations, the angles by timm's ``_get_pos_embed_from_coords``."""
    device = rope.periods.device
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    # The lengths as (1,) tensors (reductions: torch.export cannot simplify a slice's length).
    sizes = {"rows": rows.amax(0, keepdim=True) + 1, "cols": cols.amax(0, keepdim=True) + 1}
    if rope.normalize_coords == "separate":
        denoms = sizes["rows"], sizes["cols"]
    else:
        pick = torch.maximum if rope.normalize_coords == "max" else torch.minimum
        both = pick(sizes["rows"], sizes["cols"])
        denoms = both, both
    axes = [
        (torch.arange(n, dtype=torch.float32, device=device) + 0.5 + rope.grid_offset) / d
        for n, d in zip((height, width), denoms, strict=True)
    ]
    if rope.grid_indexing == "xy":
        axes = axes[::-1]
    grid = torch.stack(torch.meshgrid(axes, indexing=rope.grid_indexing), dim=-1)
    coords = (2.0 * grid - 1.0).flatten(0, -2)
    sin, cos = rope._get_pos_embed_from_coords(coords)
    return torch.cat([sin, cos], dim=-1)


@contextlib.contextmanager
def _traceable_rope(backbone: nn.Module) -> Iterator[None]:
    """Within: the DINOv3 trunk's ``rope.get_embed`` builds its grid from tensor operations."""
    rope = backbone.model.visual_model.backbone.rope

    def get_embed(shape=None, dtype=None):
        embed = _rope_embed(rope, *shape)
        return embed if dtype is None else embed.to(dtype)

    rope.get_embed = get_embed  # an instance attribute shadows the method
    try:
        yield
    finally:
        del rope.get_embed


class ExportedForward(nn.Module):
    """``backbone(images)`` written for ``torch.export`` with a symbolic image size: the patch
    fit without shape-dependent Python branches, the eager blocks (never a compiled
    ``run_blocks``).

    Args:
        backbone: a dense backbone of a family :func:`export_onnx` supports.
    """

    def __init__(self, backbone: DenseBackbone) -> None:
        super().__init__()
        self.kind = _backbone_kind(backbone)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, C, ceil(H/p), ceil(W/p))."""
        backbone, p = self.backbone, self.backbone.patch_size
        height, width = images.shape[-2:]
        size = ((height + p - 1) // p * p, (width + p - 1) // p * p)
        if getattr(backbone, "patch_fit", "pad") == "stretch" and self.kind == "dinov3txt":
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        else:
            images = F.pad(images, (0, size[1] - width, 0, size[0] - height))
        grid = (images.shape[2] // p, images.shape[3] // p)
        patches = backbone.run_blocks(*backbone.embed(images))
        return patches.transpose(1, 2).reshape(images.shape[0], -1, *grid)


def check_example_size(size, patch_size: int | None = None) -> tuple[int, int]:
    """``size`` as (H, W), two integers above ``patch_size`` (when given); :class:`ExportError`
    naming it otherwise. torch.export would fix a one-patch side in the graph (it specialises
    sizes of 1), as it would a batch of 1, which is why the example batch holds 2 images."""
    sides = tuple(size) if isinstance(size, list | tuple) else (size,)
    if len(sides) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in sides):
        raise ExportError(f"example_size must be [H, W], two integers, got {size!r}")
    if patch_size is not None and min(sides) <= patch_size:
        raise ExportError(
            f"example_size {list(sides)}: both sides must exceed the patch size {patch_size} "
            "(a one-patch grid would be fixed in the graph)"
        )
    return sides


def onnx_metadata(backbone: DenseBackbone) -> dict[str, str]:
    """What a deployment needs besides the graph, as ONNX metadata (strings; JSON values):
    ``mean``, ``std`` (the input normalisation), ``patch_size``, ``embed_dim``, ``backbone``
    (the registry name, ``null`` when built directly) and ``patch_fit`` (the segmenter's rule,
    see :class:`~spar.models.base.DenseBackbone`)."""
    identity = backbone.identity or {}
    values = {
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "patch_size": backbone.patch_size,
        "embed_dim": backbone.embed_dim,
        "backbone": identity.get("name"),
        "patch_fit": getattr(backbone, "patch_fit", "pad"),
    }
    return {key: json.dumps(value) for key, value in values.items()}


def export_onnx(
    backbone: DenseBackbone,
    path: str | Path,
    example_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the ONNX file of ``backbone``'s dense forward, batch, height and width dynamic.

    Args:
        backbone: a ``tiny``/``maskclip``/``clip`` (``maskclip`` dense head), ``siglip2`` or
            ``dinov3txt`` backbone (trained or not); exported in float32 on the CPU, in eval
            mode (a copy of its state is not made: it is moved back afterwards).
        path: the ``.onnx`` file to write (atomically).
        example_size: (H, W) of the example batch (of 2) the graph is traced with, both above
            the patch size (any size works afterwards); default: two patches less than the
            native size, plus 3.
        opset: the ONNX opset.

    Returns:
        ``path``. Input ``images`` (B, 3, H, W) float32, output ``features`` (B, C, h, w);
        metadata :func:`onnx_metadata`.
    """
    path = check_destination(path, ".onnx")
    kind = _backbone_kind(backbone)
    p = backbone.patch_size
    if example_size is None:
        example_size = tuple(max(p, n - 2 * p) + 3 for n in backbone.native_size)
    sides = check_example_size(example_size, p)
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail here with the install hint)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(
            f"ONNX export needs the onnx extra: pip install 'spar[onnx]' ({error.name} missing)"
        ) from None
    example = torch.randn(2, 3, *sides, device=module_device(backbone))
    check_images(example)
    dims = {
        0: torch.export.Dim("batch", min=1, max=MAX_BATCH),
        2: torch.export.Dim("height", min=1, max=MAX_SIDE),
        3: torch.export.Dim("width", min=1, max=MAX_SIDE),
    }
    device, training = backbone.device, backbone.training
    dtype = next(backbone.parameters()).dtype
    backbone.to(device="cpu", dtype=torch.float32).eval()
    rope = _traceable_rope(backbone) if kind == "dinov3txt" else contextlib.nullcontext()
    try:
        with rope, torch.no_grad(), atomic_path(path) as temporary:
            program = torch.onnx.export(
                ExportedForward(backbone).eval(),
                (example,),
                dynamic_shapes=(dims,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            program.model.metadata_props.update(onnx_metadata(backbone))
            program.save(str(temporary), external_data=False)
    finally:
        backbone.to(device=device, dtype=dtype).train(training)
    return path


def export_text_embeddings(
    backbone: DenseBackbone,
    class_names: Sequence,
    path: str | Path,
    templates: str | Sequence[Template] = PROTOCOL.templates,
) -> Path:
    """Write the prompt-ensemble text embeddings of ``class_names`` to a safetensors file.

    Tensors: ``embeddings`` (N_names, C) float32 unit-norm (synonyms adjacent, in class order)
    and ``name_to_class`` (N_names,) int64, as :func:`spar.text_classifier.build_text_classifier`
    returns them; the metadata ``classes`` holds the class names (one line per class, synonyms
    joined by ``", "``). The cosine of these with the L2-normalised dense features is the
    segmenter's name logit.
    """
    from safetensors.torch import save_file

    path = check_destination(path, ".safetensors")
    synonyms = parse_classes(class_names)
    embeddings, name_to_class = build_text_classifier(
        backbone.encode_text, class_names, templates=templates
    )
    tensors = {
        "embeddings": embeddings.float().cpu().contiguous(),
        "name_to_class": name_to_class.long().cpu().contiguous(),
    }
    metadata = {"classes": "\n".join(", ".join(group) for group in synonyms)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


__all__ = [
    "ExportError",
    "ExportedForward",
    "check_destination",
    "check_example_size",
    "export_onnx",
    "export_text_embeddings",
]
