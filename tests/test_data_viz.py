"""Image loading, resizing, normalisation and pictures."""

import numpy as np
import pytest
import torch
from PIL import Image

from spar.data import list_images, load_image, resize_to_fit, to_model_input
from spar.viz import overlay, palette, pca_rgb, side_by_side, to_pil


def write_image(path, size=(40, 30), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_load_image_gives_rgb_in_unit_range(tmp_path):
    image = load_image(write_image(tmp_path / "red.png"))
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert image[0].min() == 1.0 and image[1:].max() == 0.0


def test_corrupt_and_missing_images_are_named(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def test_list_images_recurses_and_names_empty_roots(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_image(tmp_path / "a" / "one.png")
    write_image(tmp_path / "a" / "b" / "two.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(tmp_path)] == ["two.JPG", "one.png"]  # a/b/ < a/one
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (672, 896)),
        ((1000, 3000), (672, 2016)),
        ((1000, 5000), (410, 2048)),
        ((672, 2048), (672, 2048)),
    ],
)
def test_resize_to_fit_keeps_the_aspect_ratio(size, expected):
    assert resize_to_fit(torch.rand(3, *size), (2048, 672)).shape[-2:] == expected


def test_to_model_input_normalises(tiny_backbone):
    image = torch.full((3, 4, 5), 0.5)
    normalised = to_model_input(image, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert normalised.shape == (1, 3, 4, 5)
    assert normalised[0, :, 0, 0].tolist() == [0.0, 1.0, 0.5]
    assert torch.equal(
        tiny_backbone.normalize(image), to_model_input(image, tiny_backbone.mean, tiny_backbone.std)
    )


def test_palette_is_distinct_and_starts_black():
    colours = palette(21)
    assert colours.shape == (21, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert len({tuple(c) for c in colours}) == 21


def test_overlay_adds_a_legend_of_present_classes():
    image = torch.rand(3, 64, 48)
    mask = torch.zeros(64, 48, dtype=torch.long)
    mask[:, 24:] = 2
    picture = overlay(image, mask, ["background", "sky", "road"])
    assert picture.height == 64 and picture.width > 48
    blended = np.asarray(picture)[:64, :48].astype(int)
    original = np.asarray(to_pil(image)).astype(int)
    assert np.abs(blended[:, 24:] - original[:, 24:]).max() > 0, "class 2 is coloured"
    with pytest.raises(ValueError, match="mask shape"):
        overlay(image, mask[:10], ["background", "sky", "road"])


def test_pca_pictures_share_one_basis():
    # Two different maps that share three feature directions (scaled by 2 in the second map):
    # with one basis the shared cells get the same colours in both pictures, and the second
    # picture differs from the one its map gets alone (its own basis, its own colour range).
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(16, 4, 6, generator=generator)
    second = torch.randn(16, 3, 5, generator=generator) + torch.linspace(-2, 2, 16)[:, None, None]
    second[:, 0, :3] = 2 * first[:, 1, 2:5]
    pictures = pca_rgb([first, second])
    assert [p.shape for p in pictures] == [(3, 4, 6), (3, 3, 5)]
    torch.testing.assert_close(pictures[1][:, 0, :3], pictures[0][:, 1, 2:5])
    assert not torch.allclose(pca_rgb([second])[0], pictures[1], atol=0.05)
    assert all(0 <= p.min() and p.max() <= 1 and p.max() > p.min() for p in pictures)
    upsampled = pca_rgb([first, second], size=(8, 12))
    assert [p.shape for p in upsampled] == [(3, 8, 12), (3, 8, 12)]
    torch.testing.assert_close(upsampled[0][:, ::2, ::2], pictures[0])


def test_side_by_side_places_pictures_left_to_right():
    pictures = [Image.new("RGB", (20, 10)), Image.new("RGB", (30, 12))]
    combined = side_by_side(pictures, ["a", "b"], gap=5)
    assert combined.width == 55 and combined.height == 12 + 18
