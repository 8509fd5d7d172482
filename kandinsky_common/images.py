"""Image grids for validation and generation outputs, and the generated images as files."""

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


def save_images(images: list[Image.Image], out_dir: str | Path) -> list[Path]:
    """out_dir/000.png, 001.png, ... and, for several images, out_dir/grid.png of them all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{i:03d}.png")
        im.save(paths[-1])
    if len(images) > 1:
        paths.append(save_grid(images, out / "grid.png"))
    return paths
