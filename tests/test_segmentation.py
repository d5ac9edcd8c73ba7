"""Open-vocabulary segmenter with a fake text encoder and hand-made feature maps."""

import pytest
import torch
import torch.nn.functional as F

from spar.models import SlidingWindowTeacher
from spar.segmentation import (
    PROMPT_TEMPLATES,
    OpenVocabSegmenter,
    build_text_classifier,
    load_class_names,
    parse_classes,
)

VOCABULARY = ["background", "sky", "road", "street", "car"]
CLASSES = ["background", "sky", "road, street", "car"]


def basis(name: str) -> torch.Tensor:
    return F.one_hot(torch.tensor(VOCABULARY.index(name)), len(VOCABULARY)).float()


class FakeTextEncoder:
    """Maps a prompt to the basis vector of the vocabulary word it mentions; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        rows = []
        for prompt in prompts:
            words = prompt.replace(".", " ").split()
            (name,) = [w for w in VOCABULARY if w in words]
            rows.append(3.0 * basis(name))
        return torch.stack(rows)


def features_from_names(grid: list[list[str]]):
    """A dense-feature function returning, for any image, the basis map of ``grid`` (h, w)."""
    table = torch.stack([torch.stack([basis(n) for n in row]) for row in grid]).permute(2, 0, 1)

    def features(images: torch.Tensor) -> torch.Tensor:
        return table[None].expand(images.shape[0], -1, -1, -1)

    return features


def images_for(grid, batch=1):
    return torch.zeros(batch, 3, 16 * len(grid), 16 * len(grid[0]))


def segmenter(grid, **kwargs):
    return OpenVocabSegmenter(features_from_names(grid), FakeTextEncoder(), CLASSES, **kwargs)


def test_each_pixel_gets_its_class():
    grid = [["sky", "sky", "car"], ["road", "background", "car"]]
    mask = segmenter(grid).predict(images_for(grid), output_size=(2, 3))
    assert mask.tolist() == [[[1, 1, 3], [2, 0, 3]]]


def test_synonyms_are_merged_by_max():
    grid = [["street", "road"]]
    seg = segmenter(grid)
    scores = seg.logits(images_for(grid), output_size=(1, 2))
    assert seg.predict(images_for(grid), output_size=(1, 2)).tolist() == [[[2, 2]]]
    names = seg.name_logits(images_for(grid), output_size=(1, 2)).softmax(1)
    # the class score is the larger of its two names' probabilities
    assert torch.allclose(scores[0, 2], torch.maximum(names[0, 2], names[0, 3]))


def test_output_size_and_default_size():
    grid = [["sky", "car"]]
    seg = segmenter(grid)
    assert seg.predict(images_for(grid, batch=2)).shape == (2, 16, 32)
    assert seg.predict(images_for(grid), output_size=(17, 23)).shape == (1, 17, 23)
    assert seg.logits(images_for(grid), output_size=(5, 7)).shape == (1, 4, 5, 7)


def test_probability_threshold_sends_unsure_pixels_to_background():
    def ambiguous(images):
        return (
            ((basis("sky") + basis("car")) / 2).view(1, -1, 1, 1).expand(images.shape[0], -1, 2, 2)
        )

    images = torch.zeros(1, 3, 32, 32)
    sure = OpenVocabSegmenter(ambiguous, FakeTextEncoder(), CLASSES)
    unsure = OpenVocabSegmenter(ambiguous, FakeTextEncoder(), CLASSES, prob_threshold=0.6)
    assert set(sure.predict(images).unique().tolist()) <= {1, 3}
    assert unsure.predict(images).unique().tolist() == [0]


def test_area_threshold_removes_small_regions():
    grid = [["sky"] * 8 for _ in range(8)]
    grid[3][4] = "car"
    images = images_for(grid)
    assert 3 in segmenter(grid).predict(images).unique().tolist()
    cleaned = segmenter(grid, area_threshold=0.05).predict(images)
    assert cleaned.unique().tolist() == [0, 1]
    assert (cleaned == 0).sum() == (segmenter(grid).predict(images) == 3).sum()


def test_text_embeddings_are_computed_once():
    grid = [["sky"]]
    encoder = FakeTextEncoder()
    seg = OpenVocabSegmenter(features_from_names(grid), encoder, CLASSES)
    calls = encoder.calls
    assert calls >= 1
    seg.predict(images_for(grid))
    seg.predict(images_for(grid))
    assert encoder.calls == calls
    assert seg.text_embeddings.shape == (5, 5)


def test_template_ensemble_averages_normalised_embeddings():
    templates = [lambda c: f"a {c}.", lambda c: f"the {c} picture."]
    offsets = {"a": torch.tensor([0.0, 0.0, 1.0]), "the": torch.tensor([0.0, 5.0, 0.0])}

    def encode(prompts):
        return torch.stack([torch.tensor([2.0, 0.0, 0.0]) + offsets[p.split()[0]] for p in prompts])

    embeddings, name_to_class = build_text_classifier(encode, ["cat"], templates)
    first = F.normalize(torch.tensor([2.0, 0.0, 1.0]), dim=0)
    second = F.normalize(torch.tensor([2.0, 5.0, 0.0]), dim=0)
    expected = F.normalize((first + second) / 2, dim=0)
    torch.testing.assert_close(embeddings[0], expected)
    assert name_to_class.tolist() == [0]


def test_the_default_ensemble_is_the_80_imagenet_templates():
    assert len(PROMPT_TEMPLATES) == 80
    assert all("cat" in template("cat") for template in PROMPT_TEMPLATES)


def test_parse_classes():
    assert parse_classes(["sky", "person, pedestrian ,", ["tv", "monitor"]]) == [
        ["sky"],
        ["person", "pedestrian"],
        ["tv", "monitor"],
    ]


@pytest.mark.parametrize("classes", [[], ["sky", " , "], ["sky", []], "sky"])
def test_bad_class_lists_are_rejected(classes):
    with pytest.raises(ValueError):
        parse_classes(classes)


def test_empty_class_list_rejected_by_the_segmenter():
    with pytest.raises(ValueError, match="empty"):
        OpenVocabSegmenter(features_from_names([["sky"]]), FakeTextEncoder(), [])


def test_load_class_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\n\nperson, pedestrian\ntv monitor,television\n")
    assert load_class_names(path) == [
        ["background"],
        ["person", "pedestrian"],
        ["tv monitor", "television"],
    ]
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        load_class_names(tmp_path / "nothing.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="blank.txt"):
        load_class_names(tmp_path / "blank.txt")


def test_bad_images_and_sizes_are_rejected():
    seg = segmenter([["sky"]])
    with pytest.raises(ValueError, match="shape"):
        seg.predict(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="output_size"):
        seg.predict(torch.zeros(1, 3, 16, 16), output_size=(0, 4))


@pytest.mark.parametrize("use_teacher", [False, True])
def test_real_backbone_and_teacher_end_to_end(tiny_backbone, use_teacher):
    dense = SlidingWindowTeacher(tiny_backbone, window=64, stride=24) if use_teacher else None
    seg = OpenVocabSegmenter.from_backbone(
        tiny_backbone, ["sky", "road, street", "car"], dense=dense
    )
    images = torch.randn(2, 3, 90, 120)
    scores = seg.logits(images)
    assert scores.shape == (2, 3, 90, 120)
    assert ((scores >= 0) & (scores <= 1)).all()
    mask = seg.predict(images, output_size=(45, 60))
    assert mask.shape == (2, 45, 60) and mask.dtype == torch.long
    assert torch.equal(mask, seg.logits(images, output_size=(45, 60)).argmax(1))
