"""The helpers that replaced repeated code (issue 21): the keep-ratio rule of the training views,
the short-side upscale, header sizes, integer settings, the finite check before saving, the PCA
picture, display names and one-call timing. Expected values are written out by hand."""

import numpy as np
import pytest
import torch
from PIL import Image

from spar.config import is_int_not_bool
from spar.distill.augment import (
    AugmentationRecipe,
    draw_plan,
    plan_generator,
    upscale_to_short_side,
)
from spar.distill.buckets import image_size_or_none
from spar.segmentation import display_names
from spar.timing import timed_call
from spar.utils import NonFiniteError, check_finite_before_saving
from spar.viz import pca_picture


def test_training_views_round_halves_up_as_the_protocol():
    """A (400, 1001) image fitted to (4000, 200) scales by 0.5 to (200, 500.5): mmcv's rule
    (int(x + 0.5)) gives 501 where Python's round() gave 500."""
    recipe = AugmentationRecipe(bounds=(4000, 200), scale_range=(1.0, 1.0), crop_prob=0.0)
    plan = draw_plan((400, 1001), recipe, plan_generator(0, 0))
    assert plan.resized == (200, 501)


def test_the_short_side_upscale_rounds_up():
    # 512 / 300 = 1.70666...; 451 * 1.70666... = 769.71 -> 770.
    assert upscale_to_short_side(300, 451, 512) == (512, 770)
    assert upscale_to_short_side(451, 300, 512) == (770, 512)
    assert upscale_to_short_side(256, 1024, 512) == (512, 2048)  # exact: no extra pixel
    assert upscale_to_short_side(600, 900, 512) == (600, 900)  # large enough: kept


def test_image_size_or_none(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert image_size_or_none(tmp_path / "wide.png") == (10, 20)
    assert image_size_or_none(tmp_path / "broken.png") is None
    assert image_size_or_none(tmp_path / "missing.png") is None


def test_is_int_not_bool():
    assert is_int_not_bool(3) and is_int_not_bool(0) and is_int_not_bool(-2)
    assert not is_int_not_bool(True) and not is_int_not_bool(False)
    assert not is_int_not_bool(3.0) and not is_int_not_bool("3") and not is_int_not_bool(None)


def test_check_finite_before_saving_names_the_parameter_and_ignores_integers():
    state = {
        "steps": torch.tensor([7], dtype=torch.int64),
        "blocks.0.weight": torch.ones(2, 2),
        "blocks.1.bias": torch.tensor([0.0, float("nan"), float("inf")]),
    }
    with pytest.raises(NonFiniteError) as error:
        check_finite_before_saving(state, "run/last.safetensors at step 3")
    assert str(error.value).startswith(
        "parameter blocks.1.bias, to be saved in run/last.safetensors at step 3, holds 2 NaN/inf "
        "values out of 3;"
    )
    check_finite_before_saving({"steps": state["steps"], "w": torch.zeros(3)}, "x")  # no error


def test_pca_picture_puts_the_image_beside_maps_in_one_basis():
    torch.manual_seed(0)
    pixels = torch.rand(3, 8, 12)
    features = torch.randn(4, 2, 3)
    picture = pca_picture(pixels, [features, features.clone()], ["image", "a", "b"])
    # Three 12-pixel-wide panels, 8 px apart; a title band above the 8-pixel-high image.
    assert picture.width == 3 * 12 + 2 * 8 and picture.height > 8
    array = np.asarray(picture)
    image_panel = array[-8:, 0:12]
    first, second = array[-8:, 20:32], array[-8:, 40:52]
    expected = (pixels.permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(image_panel.astype(float) - expected).max() <= 1
    assert np.array_equal(first, second)  # the same features get the same colours
    # Each patch of the 2 x 3 grid is a 4 x 4 block of one colour (nearest upsampling).
    assert (first[:4, :4] == first[0, 0]).all() and (first[4:, 8:] == first[4, 8]).all()


def test_display_names_are_the_first_synonyms():
    assert display_names(["person, pedestrian", ["tv", "monitor"], " sky "]) == [
        "person",
        "tv",
        "sky",
    ]


def test_timed_call_calls_once_and_returns_the_value():
    calls = []
    value, seconds = timed_call(lambda: calls.append(1) or "done", torch.device("cpu"))
    assert value == "done" and calls == [1] and seconds >= 0
