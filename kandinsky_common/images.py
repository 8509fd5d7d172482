"""Image grids for validation and generation outputs."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def save_grid(images: list[Image.Image], path: str | Path, cols: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, cols).save(path)
    return path
