"""Training-free open-vocabulary segmentation: dense features against class-name embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from .models.base import check_images

Template = Callable[[str], str]
ClassEntry = str | Sequence[str]

# The 80 ImageNet prompt templates of CLIP, as open_clip ships them (callables name -> prompt).
PROMPT_TEMPLATES: tuple[Template, ...] = tuple(OPENAI_IMAGENET_TEMPLATES)


def parse_classes(classes: Sequence[ClassEntry]) -> list[list[str]]:
    """Normalise a class list to synonym lists.

    Each entry is a name, a comma-separated string of synonyms (``"person, pedestrian"``) or a
    sequence of synonyms. Returns one list of stripped, non-empty names per class.
    """
    if isinstance(classes, str):
        raise ValueError(f"classes must be a list of class entries, not the string {classes!r}")
    parsed = []
    for index, entry in enumerate(classes):
        parts = entry.split(",") if isinstance(entry, str) else list(entry)
        names = [str(name).strip() for name in parts if str(name).strip()]
        if not names:
            raise ValueError(f"class {index} ({entry!r}) has no name")
        parsed.append(names)
    if not parsed:
        raise ValueError("the class list is empty: give at least one class name")
    return parsed


def load_class_names(path: str | Path) -> list[list[str]]:
    """Read a class-name file: one class per line, comma-separated synonyms, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"class-name file {path} holds no class names")
    return parse_classes(lines)


@torch.no_grad()
def build_text_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classes: Sequence[ClassEntry],
    templates: Sequence[Template] = PROMPT_TEMPLATES,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-ensemble text embeddings of every name of every class.

    For each name, all templates are encoded, each embedding L2-normalised, averaged over the
    templates, and the average renormalised.

    Returns:
        embeddings: (N_names, C) float32, unit norm.
        name_to_class: (N_names,) long, the class index of every name.
    """
    if not templates:
        raise ValueError("at least one prompt template is needed")
    synonyms = parse_classes(classes)
    names = [name for group in synonyms for name in group]
    name_to_class = torch.tensor([i for i, group in enumerate(synonyms) for _ in group])
    prompts = [template(name) for name in names for template in templates]
    chunks = [
        F.normalize(encode_text(prompts[start : start + batch_size]).float(), dim=-1)
        for start in range(0, len(prompts), batch_size)
    ]
    per_prompt = torch.cat(chunks).view(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1), name_to_class


class OpenVocabSegmenter(nn.Module):
    """Per-pixel classification of dense features by cosine similarity to class-name embeddings.

    Args:
        features: ``(B, 3, H, W) -> (B, C, h, w)`` dense features (a backbone or a teacher).
        encode_text: ``list[str] -> (N, C)`` text encoder in the same space.
        classes: class entries; each a name, ``"name, synonym"`` or a list of synonyms.
        logit_scale: multiplies the cosine similarity (40 in the paper's default protocol).
        logit_bias: added to the scaled cosine.
        prob_threshold: pixels whose best class probability is below it become class 0.
        area_threshold: per image, predicted classes covering less than this fraction of the
            image become class 0 (applied after ``prob_threshold``).
        templates: prompt templates for the text ensemble.
    """

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], torch.Tensor],
        classes: Sequence[ClassEntry],
        logit_scale: float = 40.0,
        logit_bias: float = 0.0,
        prob_threshold: float | None = None,
        area_threshold: float | None = None,
        templates: Sequence[Template] = PROMPT_TEMPLATES,
    ) -> None:
        super().__init__()
        self.features = features
        self.class_names = parse_classes(classes)
        embeddings, name_to_class = build_text_classifier(encode_text, classes, templates)
        self.register_buffer("text_embeddings", embeddings)
        self.register_buffer("name_to_class", name_to_class)
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.prob_threshold = prob_threshold
        self.area_threshold = area_threshold

    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        classes: Sequence[ClassEntry],
        dense: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> OpenVocabSegmenter:
        """Segment with ``dense`` (default: the backbone's single pass) and the backbone's text."""
        return cls(dense or backbone, backbone.encode_text, classes, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _output_size(self, images: torch.Tensor, output_size) -> tuple[int, int]:
        check_images(images)
        if output_size is None:
            return tuple(images.shape[-2:])
        size = tuple(int(s) for s in output_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"output_size must be two positive ints, got {output_size!r}")
        return size

    def name_logits(self, images: torch.Tensor, output_size=None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N_names, H_out, W_out) scaled cosine per name, float32."""
        size = self._output_size(images, output_size)
        features = F.normalize(self.features(images).float(), dim=1)
        cosine = torch.einsum("bchw,nc->bnhw", features, self.text_embeddings)
        logits = self.logit_scale * cosine + self.logit_bias
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def logits(self, images: torch.Tensor, output_size=None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, K, H_out, W_out) class probabilities.

        A softmax over all names, then the max over each class's synonyms.
        """
        probabilities = self.name_logits(images, output_size).softmax(dim=1)
        batch, _, height, width = probabilities.shape
        scores = probabilities.new_full((batch, self.num_classes, height, width), -1.0)
        index = self.name_to_class.view(1, -1, 1, 1).expand_as(probabilities)
        return scores.scatter_reduce(1, index, probabilities, reduce="amax", include_self=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, output_size=None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H_out, W_out) long class indices, background rules applied."""
        scores = self.logits(images, output_size)
        confidence, mask = scores.max(dim=1)
        if self.prob_threshold is not None:
            mask[confidence < self.prob_threshold] = 0
        if self.area_threshold is not None:
            mask = self._drop_small_classes(mask)
        return mask

    def _drop_small_classes(self, mask: torch.Tensor) -> torch.Tensor:
        """Per image, classes covering less than ``area_threshold`` of the pixels become 0."""
        pixels = mask.shape[1] * mask.shape[2]
        counts = torch.stack(
            [torch.bincount(m.flatten(), minlength=self.num_classes) for m in mask]
        )
        small = counts < self.area_threshold * pixels  # (B, K)
        return torch.where(small.gather(1, mask.flatten(1)).view_as(mask), 0, mask)
