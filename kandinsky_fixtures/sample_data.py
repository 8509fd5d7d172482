"""A small image-caption dataset of real photos, as a datasets "imagefolder" (framework-free).

Random noise images would hide bugs a fine-tuning data pipeline has with real pictures (EXIF-free
JPEG decoding, grey sources, odd aspect ratios, center crops), and the hub is out of reach. The
photos scikit-image bundles in its wheel load offline, so the dataset is derived from those:
every image is a deterministic crop, flip or resize of one of them, with a caption saying which.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kandinsky_common.errors import UserError

# (skimage.data loader, index into its result or None, caption). Only files shipped inside the
# scikit-image wheel: the loaders for the others fetch from the network through pooch.
_SOURCES = (
    ("chelsea", None, "a photo of a tabby cat"),
    ("astronaut", None, "a portrait photo of an astronaut in front of a flag"),
    ("coffee", None, "a photo of a cup of coffee on a saucer"),
    ("rocket", None, "a photo of a rocket on a launch pad"),
    ("camera", None, "a black and white photo of a photographer with a camera"),
    ("hubble_deep_field", None, "a telescope image of many distant galaxies"),
    ("stereo_motorcycle", 0, "a photo of a red motorcycle in a garage"),
    ("coins", None, "a black and white photo of old coins"),
    ("immunohistochemistry", None, "a microscope image of stained tissue"),
    ("moon", None, "a black and white photo of the surface of the moon"),
    ("retina", None, "a photo of the retina of a human eye"),
    ("clock", None, "a blurry black and white photo of a clock"),
    ("brick", None, "a black and white photo of a brick wall"),
    ("page", None, "a photo of a printed page of text"),
)

# Each variant yields a different size and aspect ratio so resize and center-crop code sees
# landscape, portrait, square, small and large inputs.
_VARIANTS = ("full", "left", "top", "flip", "center", "strip")
_VARIANT_WORDS = {
    "full": "",
    "left": ", cropped to the left side",
    "top": ", cropped to the top",
    "flip": ", mirrored",
    "center": ", close-up of the center",
    "strip": ", a wide strip from the middle",
    "detail": ", a random detail",
}


def _load_source(name: str, index: int | None) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if index is not None:
        arr = arr[index]
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _crop_frac(img: Image.Image, left: float, top: float, right: float, bottom: float):
    w, h = img.size
    return img.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


def _variant(img: Image.Image, variant: str, rng: np.random.Generator) -> Image.Image:
    j = float(rng.uniform(-0.05, 0.05))  # per-seed jitter of the crop boxes
    if variant == "left":
        img = _crop_frac(img, 0.0, 0.0, 0.45 + j, 1.0)
    elif variant == "top":
        img = _crop_frac(img, 0.0, 0.0, 1.0, 0.5 + j)
    elif variant == "flip":
        img = ImageOps.mirror(img)
    elif variant == "center":
        img = _crop_frac(img, 0.3 + j, 0.3 + j, 0.7 + j, 0.7 + j)
    elif variant == "strip":
        img = _crop_frac(img, 0.0, 0.4 + j, 1.0, 0.6 + j)
    elif variant == "detail":
        fw, fh = rng.uniform(0.25, 0.6, size=2)
        x, y = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
        img = _crop_frac(img, x, y, x + fw, y + fh)
    # Longest side between 128 and 384 px: short sides then fall on both sides of CLIP's 224 and
    # of common decoder resolutions, and the files stay small enough for fast tests.
    longest = int(rng.integers(128, 385))
    scale = longest / max(img.size)
    size = (max(8, round(img.width * scale)), max(8, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def sample_records(n: int = 32, seed: int = 0):
    """Yield (file stem, PIL RGB image, caption) of the n images, deterministically for a seed."""
    rng = np.random.default_rng(seed)
    cache: dict[str, Image.Image] = {}
    for i in range(n):
        s = i % len(_SOURCES)
        name, index, caption = _SOURCES[s]
        round_ = i // len(_SOURCES)
        # Shifting the variant by the source index puts every variant into the first round (a
        # 32-image set has them all), and (source, variant) pairs stay unique for all rounds.
        variant = _VARIANTS[(round_ + s) % len(_VARIANTS)] if round_ < len(_VARIANTS) else "detail"
        if name not in cache:
            cache[name] = _load_source(name, index)
        img = _variant(cache[name], variant, rng)
        yield f"{i:03d}_{name}_{variant}", img, caption + _VARIANT_WORDS[variant]


def build_sample_dataset(out_dir: str | os.PathLike, n: int = 32, seed: int = 0) -> Path:
    """Write an imagefolder (images + metadata.jsonl with file_name, text) of n real photos.

    Every third image is a PNG, the rest JPEGs, so both decoders are exercised. The folder must be
    new or empty: an imagefolder loader would otherwise also pick up foreign images.
    """
    if n < 1:
        raise UserError(f"the number of images must be at least 1, got {n}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pass a new --out folder")
    try:
        import skimage.data  # noqa: F401
    except ImportError as e:
        raise UserError(
            "the sample dataset is made from scikit-image's bundled photos; "
            "install it with `pip install scikit-image`"
        ) from e
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (stem, img, caption) in enumerate(sample_records(n, seed)):
        if i % 3 == 0:
            file_name = stem + ".png"
            img.save(out / file_name, format="PNG")
        else:
            file_name = stem + ".jpg"
            img.save(out / file_name, format="JPEG", quality=90)
        rows.append({"file_name": file_name, "text": caption})
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (out / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return out
