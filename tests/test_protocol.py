"""The evaluation protocol is written once (``spar.protocol.PROTOCOL``) and every reader takes
its defaults from there: the segmenter, the pictures, the page, the evaluation, feature
extraction, the folder segmentation, the ONNX text export, the resize and the configs."""

import dataclasses
import inspect

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from spar.evaluation import evaluate_benchmark
from spar.export import export_text_embeddings
from spar.features import extract_features
from spar.imaging import resize_to_fit
from spar.protocol import PROTOCOL, BenchmarkSettings, EvalProtocol, protocol_defaults
from spar.segment_images import segment_path
from spar.segmentation import OpenVocabSegmenter, build_text_classifier
from spar.tools.app import IMAGE_BOUNDS, segment_page
from spar.viz import feature_picture, segmentation_picture

# The paper's protocol (the SPAR authors' configs: mmseg Resize to (2048, 672), logit scale 40,
# CLIP's 80 ImageNet templates, no thresholds unless a benchmark sets them).
PAPER = {
    "bounds": (2048, 672),
    "templates": "imagenet80",
    "logit_scale": 40.0,
    "logit_bias": 0.0,
    "prob_threshold": None,
    "area_threshold": None,
}


def _default(function, name):
    return inspect.signature(function).parameters[name].default


def test_the_protocol_holds_the_papers_values():
    assert dataclasses.asdict(PROTOCOL) == PAPER
    assert protocol_defaults("bounds", "logit_scale") == {"bounds": [2048, 672], "logit_scale": 40}
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROTOCOL.logit_scale = 1.0


@pytest.mark.parametrize(
    ("function", "names"),
    [
        (
            OpenVocabSegmenter.__init__,
            ("logit_scale", "logit_bias", "prob_threshold", "area_threshold", "templates"),
        ),
        (build_text_classifier, ("templates",)),
        (
            segmentation_picture,
            ("bounds", "templates", "logit_scale", "logit_bias", "prob_threshold"),
        ),
        (feature_picture, ("bounds",)),
        (segment_page, ("templates", "logit_scale", "prob_threshold", "area_threshold")),
        (evaluate_benchmark, ("bounds",)),
        (extract_features, ("bounds",)),
        (resize_to_fit, ("bounds",)),
        (segment_path, ("bounds", "templates", "logit_scale", "prob_threshold", "area_threshold")),
        (export_text_embeddings, ("templates",)),
    ],
)
def test_every_reader_defaults_to_the_protocol(function, names):
    for name in names:
        assert _default(function, name) == PAPER[name], (function.__qualname__, name)


def test_the_page_offers_the_protocol_bound():
    assert IMAGE_BOUNDS["2048x672"] == (2048, 672)


def test_the_segmenter_built_without_settings_scores_with_the_protocol():
    """logits = 40 * cosine + 0, as computed here by hand."""
    embeddings = torch.eye(2)  # two classes, unit text embeddings

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return torch.stack([embeddings[0] if "cat" in p else embeddings[1] for p in prompts])

    features = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # cosine 0.6 to cat, 0.8 to dog
    segmenter = OpenVocabSegmenter(lambda images: features, encode_text, ["cat", "dog"])
    logits = segmenter.name_logits(torch.zeros(1, 3, 16, 16), output_size=(1, 1))
    torch.testing.assert_close(logits.flatten(), torch.tensor([24.0, 32.0]))


def test_benchmark_settings_take_the_protocol_values():
    fields = {f.name: f for f in dataclasses.fields(BenchmarkSettings)}
    assert fields["bounds"].default_factory() == [2048, 672]
    for name in ("logit_scale", "logit_bias", "prob_threshold", "area_threshold"):
        assert fields[name].default == PAPER[name], name
    assert set(f.name for f in dataclasses.fields(EvalProtocol)) - set(fields) == {"templates"}


def test_the_configs_read_the_protocol():
    with initialize_config_module("spar.configs", version_base="1.3"):
        segment = compose("segment", ["image=x.jpg", "classes=[a]"])
        ade = compose("eval", ["dataset=ade20k"])
    assert OmegaConf.to_container(segment)["bounds"] == [2048, 672]
    assert (segment.logit_scale, segment.templates) == (40.0, "imagenet80")
    assert (list(ade.dataset.bounds), ade.dataset.logit_scale, ade.templates) == (
        [2048, 672],
        40.0,
        "imagenet80",
    )
