"""Training augmentation: geometry of the drawn views, determinism, the pixels they produce."""

import numpy as np
import pytest
import torch

from spar.distill import AugmentationPlan, AugmentationRecipe, apply_plan, draw_plan, plan_generator

SOURCE_SIZES = [(1500, 2250), (2250, 1500), (480, 640), (300, 451), (4000, 1000), (64, 64)]


@pytest.mark.parametrize("source", SOURCE_SIZES)
def test_views_are_multiples_of_16_within_the_bounds(source):
    recipe = AugmentationRecipe()
    for draw in range(200):
        plan = draw_plan(source, recipe, plan_generator(0, draw))
        height, width = plan.output
        assert height % 16 == 0 and width % 16 == 0 and min(plan.output) >= 16
        # The resized image fits the bound scaled by at most 1.0.
        assert max(plan.resized) <= 2048 + 1 and min(plan.resized) <= 1024 + 1
        top, left, crop_h, crop_w = plan.crop
        assert 0 <= top and top + crop_h <= plan.resized[0]
        assert 0 <= left and left + crop_w <= plan.resized[1]
        # Short sides are brought to 512 (up to the rounding down to 16).
        assert min(plan.output) >= 512 - 15
        if min(crop_h, crop_w) >= 512:
            # No upscaling: the view is the crop, rounded down to 16.
            assert (height, width) == (crop_h // 16 * 16, crop_w // 16 * 16)
            assert max(plan.output) <= 2048


def test_crop_sides_are_40_to_100_percent_and_at_least_512():
    recipe = AugmentationRecipe(crop_prob=1.0)
    crops = 0
    for draw in range(300):
        plan = draw_plan((1500, 2250), recipe, plan_generator(1, draw))
        for crop_side, side in zip(plan.crop[2:], plan.resized, strict=True):
            assert crop_side <= side
            assert crop_side >= min(side, max(512, int(0.4 * side)))
        crops += plan.crop[2:] != plan.resized
    assert crops > 250


def test_scale_ratio_flip_and_crop_probabilities():
    recipe = AugmentationRecipe()
    plans = [draw_plan((1500, 2250), recipe, plan_generator(2, d)) for d in range(1000)]
    assert 0.45 < np.mean([p.flip for p in plans]) < 0.55
    assert 0.45 < np.mean([p.crop[2:] != p.resized for p in plans]) < 0.55
    longs = [max(p.resized) for p in plans]
    assert min(longs) >= 0.5 * 1536 - 1  # 2250 x 1500 is bounded by its short side (1024)
    assert max(longs) <= 1536 + 1


def test_extended_recipe_reaches_larger_and_smaller_views():
    default = AugmentationRecipe()
    extended = AugmentationRecipe(bounds=(2560, 1280), scale_range=(0.2, 1.0))
    source = (3000, 4000)
    largest = max(max(draw_plan(source, extended, plan_generator(0, d)).output) for d in range(300))
    assert largest > max(
        max(draw_plan(source, default, plan_generator(0, d)).output) for d in range(300)
    )
    assert largest <= 2560


def test_plans_are_deterministic_and_serialisable():
    recipe = AugmentationRecipe()
    first = draw_plan((700, 900), recipe, plan_generator(5, 3, 1))
    assert first == draw_plan((700, 900), recipe, plan_generator(5, 3, 1))
    assert first != draw_plan((700, 900), recipe, plan_generator(5, 3, 2))
    assert AugmentationPlan.from_dict(first.to_dict()) == first


def test_apply_plan_produces_the_planned_view():
    image = torch.rand(3, 120, 200)
    plan = AugmentationPlan((120, 200), (60, 100), (10, 20, 40, 64), (48, 80), flip=True)
    view = apply_plan(image, plan)
    assert view.shape == (3, 48, 80)
    unflipped = apply_plan(image, AugmentationPlan(**{**plan.__dict__, "flip": False}))
    torch.testing.assert_close(view, unflipped.flip(-1))


def test_identity_plan_keeps_pixels():
    image = torch.rand(3, 64, 96)
    plan = AugmentationPlan((64, 96), (64, 96), (0, 0, 64, 96), (64, 96), flip=False)
    torch.testing.assert_close(apply_plan(image, plan), image)


def test_apply_plan_rejects_another_image_size():
    plan = AugmentationPlan((64, 96), (64, 96), (0, 0, 64, 96), (64, 96), flip=False)
    with pytest.raises(ValueError, match=r"\(64, 96\)"):
        apply_plan(torch.rand(3, 65, 96), plan)


@pytest.mark.parametrize(
    "values",
    [
        {"scale_range": [0.0, 1.0]},
        {"crop_fraction": [0.5, 1.5]},
        {"flip_prob": 2.0},
        {"min_short_side": 8},
    ],
)
def test_bad_recipes_are_rejected(values):
    with pytest.raises(ValueError):
        AugmentationRecipe.from_dict(values)


def test_recipe_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="colour_jitter"):
        AugmentationRecipe.from_dict({"colour_jitter": 0.4})
    recipe = AugmentationRecipe.from_dict({"bounds": [448, 336]})
    assert recipe.bounds == (448, 336)
