"""The text classifier of open-vocabulary segmentation: prompt-template sets and the
prompt-ensemble embedding of every name of every class (:func:`build_text_classifier`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from .class_names import ClassEntry, parse_classes
from .protocol import PROTOCOL

Template = Callable[[str], str]
TextEncoder = Callable[[list[str]], torch.Tensor]

# The 80 ImageNet prompt templates of CLIP, as open_clip ships them (callables name -> prompt).
PROMPT_TEMPLATES: tuple[Template, ...] = tuple(OPENAI_IMAGENET_TEMPLATES)


def _a_photo_of(name: str) -> str:
    return f"a photo of a {name}."


# Named template sets, the values of the ``templates`` setting: ``imagenet80`` is the paper's
# protocol; ``single`` encodes one prompt per name (80x cheaper; tests and quick looks).
TEMPLATE_SETS: dict[str, tuple[Template, ...]] = {
    "imagenet80": PROMPT_TEMPLATES,
    "single": (_a_photo_of,),
}


def resolve_templates(templates: str | Sequence[Template]) -> tuple[Template, ...]:
    """A template-set name (see :data:`TEMPLATE_SETS`) or callables ``name -> prompt``."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {templates!r}; use one of {sorted(TEMPLATE_SETS)} or a "
                "list of callables name -> prompt"
            )
        return TEMPLATE_SETS[templates]
    return tuple(templates)


def _encode_prompts(encode_text: TextEncoder, prompts: list[str], batch_size: int) -> torch.Tensor:
    """(P,) prompts -> (P, C) float32 unit-norm embeddings, ``batch_size`` prompts per call."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = encode_text(batch)
        if encoded.ndim != 2 or encoded.shape[0] != len(batch):
            raise ValueError(
                f"encode_text must map {len(batch)} prompts to a ({len(batch)}, C) tensor, "
                f"got shape {tuple(encoded.shape)}"
            )
        chunks.append(F.normalize(encoded.float(), dim=-1))
    return torch.cat(chunks)


@torch.no_grad()
def build_text_classifier(
    encode_text: TextEncoder,
    classes: Sequence[ClassEntry],
    templates: str | Sequence[Template] = PROTOCOL.templates,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-ensemble text embeddings of every name of every class.

    For each name, every template is formatted with it and encoded by ``encode_text``
    (``list[str] -> (n, C)``); each embedding is L2-normalised, the embeddings are averaged over
    the templates, and the average is renormalised.

    Returns:
        embeddings: (N_names, C) float32, unit norm; names in class order, synonyms adjacent.
        name_to_class: (N_names,) long, the class index of every name.

        Both live on the device ``encode_text`` returns its embeddings on.
    """
    templates = resolve_templates(templates)
    if not templates:
        raise ValueError("at least one prompt template is needed")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    synonyms = parse_classes(classes)
    names = [name for group in synonyms for name in group]
    prompts = [template(name) for name in names for template in templates]
    per_prompt = _encode_prompts(encode_text, prompts, batch_size)
    name_to_class = torch.tensor(
        [i for i, group in enumerate(synonyms) for _ in group], device=per_prompt.device
    )
    per_name = per_prompt.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(per_name, dim=-1), name_to_class
