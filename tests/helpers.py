"""Test helpers: paths and small generated image folders."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write_scene_images(folder: Path, count: int = 5, size: tuple[int, int] = (240, 320)) -> Path:
    """``count`` seeded synthetic scenes (sky, ground, a few shapes) as JPEGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    height, width = size
    for index in range(count):
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        horizon = int(rng.integers(height // 3, 2 * height // 3))
        draw.rectangle(
            [0, horizon, width, height], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
        for _ in range(4):
            x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            w, h = int(rng.integers(20, 80)), int(rng.integers(20, 80))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x, y, x + w, y + h], fill=colour)
        image.save(folder / f"scene_{index:02d}.jpg", quality=92)
    return folder
