"""Image grids for validation and generation outputs, and the generated images as files."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from kandinsky_common.storage import is_url, location, staged_file


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or len(images)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def save_grid(images: list[Image.Image], path: str | Path, cols: int | None = None):
    """The grid as a PNG at `path` (a local path or a gs:// URL); returns where it is."""
    with staged_file(path) as local:
        make_grid(images, cols).save(local)
    return location(path) if is_url(path) else Path(path)


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
