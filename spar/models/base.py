"""The dense-backbone contract shared by every model family.

Every backbone maps normalised images of any size to a patch-grid feature map in the joint
image-text space, and encodes text into the same space. Downstream code (teacher, trainer,
segmenter) only relies on the attributes and methods defined here.

Images whose height or width is not a multiple of the patch size are zero-padded at the bottom
and right (zero = the mean colour, since images are already normalised) up to the next multiple;
the output grid is therefore ``(ceil(H / p), ceil(W / p))``. The sliding-window teacher pads in
exactly the same way before cutting windows, so teacher and student maps always align.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..imaging import ImageInput, prepare_images, to_model_input
from ..utils import module_device

Tokenizer = Callable[[list[str]], torch.Tensor]
TrainableBlocks = str | int | Sequence[int]


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise ``ValueError`` unless ``images`` is a (B, 3, H, W) floating-point tensor."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (normalised), got {images.dtype}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(images.shape)}")


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image of ``height`` x ``width`` after padding."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def pad_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (B, 3, H, W) at the bottom/right to multiples of ``patch_size``."""
    height, width = images.shape[-2:]
    pad_h = -height % patch_size
    pad_w = -width % patch_size
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h))


def resolve_trainable_blocks(spec: TrainableBlocks, depth: int) -> list[int]:
    """Turn a trainable-block spec into sorted block indices in ``[0, depth)``.

    Accepted specs: ``"last-N"`` (the last N blocks), ``"all"``, ``"none"``, an int N (same as
    ``"last-N"``), or an explicit sequence of block indices (negative indices count from the end).
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(depth))
        if text == "none":
            return []
        if text.startswith("last-") and text[5:].isdigit():
            spec = int(text[5:])
        else:
            raise ValueError(
                f"unknown trainable-block spec {spec!r}: use 'last-N', 'all', 'none' or a list of "
                "block indices"
            )
    if isinstance(spec, bool):
        raise ValueError(f"trainable-block spec must not be a bool, got {spec!r}")
    if isinstance(spec, int):
        if not 0 <= spec <= depth:
            raise ValueError(f"cannot train the last {spec} blocks of a {depth}-block model")
        return list(range(depth - spec, depth))
    indices = []
    for index in spec:
        if not isinstance(index, int) or not -depth <= index < depth:
            raise ValueError(f"block index {index!r} out of range for a {depth}-block model")
        indices.append(index % depth)
    return sorted(set(indices))


class DenseBackbone(nn.Module):
    """Base class: any-resolution dense features plus a text encoder in the same space.

    Subclasses set the attributes below in ``__init__`` and implement ``embed``,
    ``run_blocks``, ``encode_tokens`` and ``blocks``. The image forward is ``embed`` (patch
    embedding and position encoding, whose shapes depend on the patch grid) followed by
    ``run_blocks`` (transformer blocks and dense head on a token sequence, free of grid
    arithmetic), the part :func:`spar.models.compiling.compile_backbone` compiles once for every
    image size.

    Attributes:
        patch_size: side of a square patch in pixels.
        embed_dim: dimension C of the joint image-text space.
        native_size: (H, W) pretraining resolution, the teacher's default window.
        mean, std: per-channel input normalisation (images in [0, 1] -> normalised).
        tokenizer: ``list[str] -> (N, L)`` token ids, injectable for offline use.
        identity: registry name, pretrained weights and options, set by ``create_backbone``
            (``None`` for backbones built directly); recorded in checkpoints.
        compiled_blocks: the compiled ``run_blocks`` (``None``: eager), set by
            :func:`spar.models.compiling.compile_backbone`.
        patch_fit: how the SPAR authors' evaluation fits an image whose sides are not
            multiples of ``patch_size`` to the patch grid of a single pass: ``"pad"`` (zero
            padding at the bottom/right, the grid covers the padding: SigLIP2 through timm's
            ``dynamic_img_pad``), ``"truncate"`` (the patch convolution drops the last partial
            row/column: open_clip's ``conv1`` in their MaskCLIP wrapper) or ``"stretch"`` (the
            image is resized to the nearest multiples first: their DINOv3.txt wrapper).
            :class:`spar.segmentation.OpenVocabSegmenter` reads it; in every case the grid's
            logits are then resized to the output size directly, as theirs are.
    """

    identity: dict | None = None
    compiled_blocks: Callable[..., torch.Tensor] | None = None
    patch_fit: str = "pad"

    patch_size: int
    embed_dim: int
    native_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: Tokenizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, ceil(H/p), ceil(W/p)) dense features."""
        check_images(images)
        return self.forward_padded(pad_to_patch_multiple(images, self.patch_size))

    def forward_padded(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) with H, W multiples of the patch size -> (B, C, H/p, W/p)."""
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        run_blocks = self.compiled_blocks or self.run_blocks
        patches = run_blocks(*self.embed(images))
        return patches.transpose(1, 2).reshape(images.shape[0], -1, *grid)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(B, 3, H, W), H and W multiples of p -> the inputs of :meth:`run_blocks`: first the
        (B, N, D) token sequence (prefix tokens, then the H/p * W/p patches row-major), then any
        per-grid tensors the blocks need (e.g. rotary embeddings)."""
        raise NotImplementedError

    def run_blocks(self, tokens: torch.Tensor, *grid_inputs: torch.Tensor | None) -> torch.Tensor:
        """The outputs of :meth:`embed` -> (B, H/p * W/p, C) dense features of the patches."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of N strings -> (N, C) text embeddings (not normalised)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("encode_text needs at least one string")
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.encode_tokens(tokens)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, C) text embeddings."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        """The vision transformer blocks, first to last."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(3, H, W) or (B, 3, H, W) in [0, 1] -> (B, 3, H, W) normalised for this backbone, on its
        device."""
        return to_model_input(images.to(self.device), self.mean, self.std)

    def prepare(
        self,
        images: ImageInput | Sequence[ImageInput],
        bounds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images -> this backbone's input batch, as open_clip's preprocess: load, resize to fit,
        normalise with :attr:`mean`/:attr:`std`, stack, move to :attr:`device`.

        Args:
            images: an image file, a ``PIL.Image``, a (3, H, W) float tensor in [0, 1] (or a
                (B, 3, H, W) one), or a list of these (of one size once resized).
            bounds: (long, short): resize keeping the aspect ratio to fit, by the evaluation
                protocol's resize (:func:`spar.imaging.resize_to_fit`, mmcv's exactly; the paper
                evaluates at (2048, 672)); ``None`` keeps the size.

        Returns:
            (B, 3, h, w) normalised input on this backbone's device; (h, w) is the resized size
            (the input of ``self(...)``, whose features are ``self.output_grid(h, w)``). For the
            resized pixels in [0, 1] and the original sizes as well, call
            :func:`spar.imaging.prepare_images` with this backbone's ``mean``, ``std`` and
            ``device``.
        """
        return prepare_images(images, self.mean, self.std, bounds, self.device).inputs

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size (rows, cols) for an image of ``height`` x ``width``."""
        return patch_grid(height, width, self.patch_size)

    def set_trainable_blocks(self, spec: TrainableBlocks) -> list[int]:
        """Freeze every parameter, then unfreeze the selected vision blocks.

        Returns the indices of the trainable blocks. ``"all"`` means all transformer blocks of
        the vision tower; embeddings, final norms, heads and the text tower stay frozen.
        """
        indices = resolve_trainable_blocks(spec, len(self.blocks))
        self.requires_grad_(False)
        for index in indices:
            self.blocks[index].requires_grad_(True)
        return indices

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
