"""Dataset rows to numpy batches: the reference's preprocessing, line for line, without torch.

Both backends and the encode-once cache consume these arrays, so they must be bit-identical
wherever they are computed. The CLIP path reproduces transformers' PIL-backed CLIP image processor
(resize, crop, rescale and normalize in the same dtypes and order); transformers 5's default CLIP
processor resizes with torchvision, which would put torch on the flax path and differ slightly.
Layout is NCHW float32, as the reference's collate produces.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from kandinsky_common.errors import UserError
from kandinsky_common.folders import read_json
from kandinsky_common.model_configs import IMAGE_PROCESSOR


@dataclass(frozen=True)
class ClipSpec:
    """An image-processor config reduced to what the CLIP PIL path reads."""

    do_resize: bool
    shortest_edge: int | None  # resize the short side to this, keeping the aspect ratio
    resize_hw: tuple[int, int] | None  # or resize to exactly (height, width)
    resample: int
    do_center_crop: bool
    crop_hw: tuple[int, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _size_hw(value: Any, source: str, key: str, square_int: bool) -> tuple[int | None, tuple]:
    """(shortest_edge, None) or (None, (h, w)) from any size form transformers accepts for CLIP."""
    if isinstance(value, bool):
        raise UserError(f"{source}: {key} must be a size, got {value!r}; fix or delete that entry")
    if isinstance(value, int):
        return (None, (value, value)) if square_int else (value, None)
    if isinstance(value, list | tuple) and len(value) == 2:
        return None, (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"]), None
        if set(value) == {"height", "width"}:
            return None, (int(value["height"]), int(value["width"]))
    raise UserError(
        f"{source}: unsupported {key} {value!r}; use an int, {{'shortest_edge': N}} or "
        "{'height': H, 'width': W} as CLIP processors do"
    )


def clip_spec(
    config: dict | ClipSpec = IMAGE_PROCESSOR, source: str = "image processor"
) -> ClipSpec:
    """Validate a preprocessor_config.json dict; missing keys take the CLIP processor defaults."""
    if isinstance(config, ClipSpec):
        return config
    cfg = {**IMAGE_PROCESSOR, **config}
    shortest, resize_hw = _size_hw(cfg["size"], source, "size", square_int=False)
    crop_short, crop_hw = _size_hw(cfg["crop_size"], source, "crop_size", square_int=True)
    if crop_short is not None:
        raise UserError(f"{source}: crop_size needs height and width, got {cfg['crop_size']!r}")
    mean = np.broadcast_to(np.asarray(cfg["image_mean"], dtype=np.float64), (3,))
    std = np.broadcast_to(np.asarray(cfg["image_std"], dtype=np.float64), (3,))
    return ClipSpec(
        do_resize=bool(cfg["do_resize"]),
        shortest_edge=shortest,
        resize_hw=resize_hw,
        resample=int(cfg["resample"]),
        do_center_crop=bool(cfg["do_center_crop"]),
        crop_hw=crop_hw,
        do_rescale=bool(cfg["do_rescale"]),
        rescale_factor=float(cfg["rescale_factor"]),
        do_normalize=bool(cfg["do_normalize"]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def load_image_processor_config(folder: str | os.PathLike) -> dict:
    """The CLIP processor config of a prior folder (or of its image_processor/ subfolder).

    A folder without one gets the K2.2 defaults, which is what the reference's processor holds.
    """
    folder = Path(folder)
    candidates = (folder / "image_processor", folder)
    for path in (c / "preprocessor_config.json" for c in candidates):
        if path.is_file():
            config = {**IMAGE_PROCESSOR, **read_json(path)}
            clip_spec(config, source=str(path))
            return config
    return dict(IMAGE_PROCESSOR)


def _resize_hw(height: int, width: int, spec: ClipSpec) -> tuple[int, int]:
    if spec.resize_hw is not None:
        return spec.resize_hw
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is
    # truncated, not rounded.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop_hwc(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    # transformers' center_crop: floor offsets; images smaller than the crop are zero-padded.
    height, width = arr.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    bottom, right = top + crop_h, left + crop_w
    if top >= 0 and left >= 0 and bottom <= height and right <= width:
        return arr[top:bottom, left:right]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    canvas = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = arr
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return canvas[max(0, top) : min(new_h, bottom), max(0, left) : min(new_w, right)]


def clip_pixels(img: Image.Image, config: dict | ClipSpec = IMAGE_PROCESSOR) -> np.ndarray:
    """(3, 224, 224) float32 CLIP input, equal to CLIPImageProcessorPil on `img.convert("RGB")`."""
    spec = clip_spec(config)
    return clip_normalize(clip_resized(img, spec), spec)


def clip_resized(img: Image.Image, config: dict | ClipSpec = IMAGE_PROCESSOR) -> np.ndarray:
    """The CLIP processor's resize and crop: (H, W, 3) uint8, what `clip_normalize` takes."""
    spec = clip_spec(config)
    if img.mode != "RGB":
        # The reference converts before the processor, so alpha is dropped, not composited on white.
        img = img.convert("RGB")
    if spec.do_resize:
        height, width = _resize_hw(img.height, img.width, spec)
        img = img.resize((width, height), resample=spec.resample)
    arr = np.asarray(img)
    if spec.do_center_crop:
        arr = _center_crop_hwc(arr, *spec.crop_hw)
    return np.ascontiguousarray(arr)  # a crop is a view: keep only its own bytes


def clip_normalize(arr: np.ndarray, config: dict | ClipSpec = IMAGE_PROCESSOR) -> np.ndarray:
    """(H, W, 3) uint8 from `clip_resized` -> (3, H, W) float32: rescale and normalize."""
    spec = clip_spec(config)
    chw = arr.transpose(2, 0, 1)
    if spec.do_rescale:
        # Same dtypes as transformers' rescale: multiply in float64, then round to float32.
        x = (chw.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    else:
        x = chw.astype(np.float32)
    if spec.do_normalize:
        mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def decoder_pixels(img: Image.Image, resolution: int) -> np.ndarray:
    """(3, R, R) float32 in [-1, 1]: the decoder script's center_crop + train_transforms."""
    return decoder_normalize(decoder_resized(img, resolution))


def decoder_resized(img: Image.Image, resolution: int) -> np.ndarray:
    """The decoder script's center crop and resize: (R, R, 3) uint8."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    side = min(width, height)
    # A float box, as the reference passes it: PIL rounds the edges itself.
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    img = img.crop(box)
    img = img.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
    return np.asarray(img)


def decoder_normalize(arr: np.ndarray) -> np.ndarray:
    """(R, R, 3) uint8 from `decoder_resized` -> (3, R, R) float32 in [-1, 1]."""
    x = arr.astype(np.float32) / 127.5 - 1
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class ImageMemo:
    """Decoded, resized images (uint8, before normalization) kept from one epoch to the next.

    The reference decodes and resizes every image again in every epoch; the preprocessing is
    deterministic, so the uint8 arrays after the resize are all a later epoch needs, and the
    float batch built from them is the same to the bit. Rows are kept in the order they are
    first seen until `max_bytes` is used; later rows are decoded every time (no eviction: a
    shuffled order would evict each row before its next use). Thread-safe (the decode threads
    share it).

    Parameters:
        max_bytes: the budget for all arrays kept; 0 keeps none.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.used = 0
        self._rows: dict[Any, tuple] = {}
        self._lock = threading.Lock()

    def get(self, key) -> tuple | None:
        return self._rows.get(key)

    def offer(self, key, arrays: tuple) -> None:
        size = sum(a.nbytes for a in arrays if a is not None)
        with self._lock:
            if key not in self._rows and self.used + size <= self.max_bytes:
                self._rows[key] = arrays
                self.used += size

    def __len__(self) -> int:
        return len(self._rows)

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn or forkserver gets its own empty memo.
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])


def tokenize(tokenizer, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int64 (B, L), attention_mask bool (B, L)), L = tokenizer.model_max_length."""
    max_length = tokenizer.model_max_length
    if not isinstance(max_length, int) or max_length > 100_000:
        raise UserError(
            f"the tokenizer has no usable model_max_length ({max_length!r}); use the prior "
            "folder's tokenizer/ (model_max_length 77)"
        )
    enc = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(bool)


def caption_choice(seed: int, epoch: int, row: int, count: int) -> int:
    """Which of a row's `count` captions an epoch trains on (the reference's random.choice),
    drawn from (seed, epoch, row): a resumed run, and the embeddings cache, pick the same."""
    return int(np.random.default_rng([seed, int(epoch), int(row)]).integers(count))


def _caption_list(caption) -> Sequence[str]:
    """A row's captions: a str is one; a list must be non-empty strings."""
    if isinstance(caption, str):
        return [caption]
    if (
        isinstance(caption, Sequence | np.ndarray)
        and len(caption) > 0
        and all(isinstance(c, str) for c in caption)
    ):
        return caption
    raise UserError(
        f"caption {caption!r} is neither a string nor a non-empty list of strings; "
        "fix the caption column"
    )


def choose_caption(caption: str | Sequence[str], seed: int, epoch: int, row: int) -> str:
    """A str as is; one entry of a list, drawn by `caption_choice`."""
    captions = _caption_list(caption)
    if isinstance(caption, str):
        return caption
    return captions[caption_choice(seed, epoch, row, len(captions))]


def _where(path: str | None, index: int | None) -> str:
    parts = []
    if path:
        parts.append(f"image file {path!r}")
    if index is not None:
        parts.append(f"row {index}")
    return " / ".join(parts) or "an image"


def decode_image(value: Any, index: int | None = None, mode: str | None = None) -> Image.Image:
    """A fully decoded PIL image from a datasets cell: PIL image, {bytes, path} dict, bytes or path.

    Decoding follows datasets' Image feature (load, EXIF orientation, optional mode) so that a cell
    becomes the same pixels the reference's dataset would hand it. Truncated files are caught
    because load() decodes everything (PIL's LOAD_TRUNCATED_IMAGES is left off).
    """
    path = None
    if isinstance(value, Image.Image):
        image = value
        source = None
    elif isinstance(value, dict) and ("bytes" in value or "path" in value):
        path = value.get("path")
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else path
    elif isinstance(value, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(value))
    elif isinstance(value, str | os.PathLike):
        path = os.fspath(value)
        source = path
    else:
        raise UserError(
            f"{_where(None, index)} holds a {type(value).__name__}, not an image; "
            "fix the image column"
        )
    if source is None and not isinstance(value, Image.Image):
        raise UserError(f"{_where(path, index)} has neither bytes nor a path; remove the row")
    try:
        if source is not None:
            if isinstance(source, str):
                source = os.path.expanduser(source)
            image = Image.open(source)
        image.load()
        if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
            image = ImageOps.exif_transpose(image)
        if mode and mode != image.mode:
            image = image.convert(mode)
    except UserError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(
            f"{_where(path, index)} cannot be decoded ({reason}); remove or replace it"
        ) from e
    return image


class BatchBuilder:
    """Dataset rows at given indices -> one numpy batch; a pure function of (indices, epoch).

    Keys: `clip_pixel_values` (B, 3, 224, 224) float32 always; `text_input_ids` (B, 77) int64 and
    `text_mask` (B, 77) bool with a caption column and tokenizer (prior); `pixel_values`
    (B, 3, R, R) float32 with a resolution (decoder). A list caption is drawn with a generator
    seeded by (seed, epoch, index), so a resumed run picks the captions an uninterrupted one would.
    With a `memo`, each row is decoded and resized once while the memo has room.
    """

    def __init__(
        self,
        dataset,
        *,
        image_column: str,
        caption_column: str | None = None,
        tokenizer=None,
        resolution: int | None = None,
        image_processor_config: dict | ClipSpec = IMAGE_PROCESSOR,
        seed: int | None = 0,
        num_threads: int = 1,
        memo: ImageMemo | None = None,
    ):
        import datasets

        if (caption_column is None) != (tokenizer is None):
            raise ValueError("caption_column and tokenizer are given together or not at all")
        self.image_column = image_column
        self.caption_column = caption_column
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.clip = clip_spec(image_processor_config)
        self.seed = 0 if seed is None else int(seed)
        self.num_threads = max(1, int(num_threads))
        self.memo = memo
        self._executor: ThreadPoolExecutor | None = None
        columns = [image_column] + ([caption_column] if caption_column else [])
        ds = dataset.select_columns(columns).with_format(None)
        feature = ds.features[image_column]
        self._mode = None
        if isinstance(feature, datasets.Image):
            self._mode = feature.mode
            # Raw {bytes, path} cells: we decode ourselves, to name the bad file in the error.
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self._dataset = ds

    def __len__(self) -> int:
        return len(self._dataset)

    def _pixels(self, value: Any, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        key = (id(self), index)  # a memo may be shared with another builder (DreamBooth's)
        resized = self.memo.get(key) if self.memo is not None else None
        if resized is None:
            image = decode_image(value, index, self._mode)
            if image.mode != "RGB":
                image = image.convert("RGB")
            resized = (
                clip_resized(image, self.clip),
                decoder_resized(image, self.resolution) if self.resolution else None,
            )
            if self.memo is not None:
                self.memo.offer(key, resized)
        clip = clip_normalize(resized[0], self.clip)
        return clip, None if resized[1] is None else decoder_normalize(resized[1])

    def __call__(
        self, indices: np.ndarray, epoch: int, *, with_captions: bool = True
    ) -> dict[str, np.ndarray]:
        """The batch of rows `indices` in `epoch`; without its captions if not `with_captions`
        (the embeddings cache encodes every caption of a list on its own, see `captions`)."""
        rows = [int(i) for i in np.asarray(indices).reshape(-1)]
        cells = self._dataset[rows]
        images = cells[self.image_column]
        if self.num_threads > 1:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.num_threads, "kandinsky-decode")
            # PIL releases the GIL while decoding and resizing; map keeps the order.
            pixels = list(self._executor.map(self._pixels, images, rows))
        else:
            pixels = [self._pixels(value, row) for value, row in zip(images, rows, strict=True)]
        batch = {"clip_pixel_values": np.stack([p[0] for p in pixels])}
        if self.resolution:
            batch["pixel_values"] = np.stack([p[1] for p in pixels])
        if self.caption_column is not None and with_captions:
            captions = [
                choose_caption(caption, self.seed, epoch, row)
                for caption, row in zip(cells[self.caption_column], rows, strict=True)
            ]
            batch["text_input_ids"], batch["text_mask"] = tokenize(self.tokenizer, captions)
        return batch

    def caption_counts(self) -> np.ndarray:
        """How many captions each row has (1 for a string), int64 (N,)."""
        column = self._dataset.select_columns([self.caption_column])[self.caption_column]
        return np.array([len(_caption_list(c)) for c in column], np.int64)

    def captions(self, indices: np.ndarray, choices: np.ndarray) -> dict[str, np.ndarray]:
        """The tokenized caption `choices[i]` of row `indices[i]`, without the images: the
        `text_input_ids` and `text_mask` keys of a batch."""
        rows = [int(i) for i in np.asarray(indices).reshape(-1)]
        cells = self._dataset.select_columns([self.caption_column])[rows][self.caption_column]
        captions = [_caption_list(c)[int(j)] for c, j in zip(cells, choices, strict=True)]
        ids, mask = tokenize(self.tokenizer, captions)
        return {"text_input_ids": ids, "text_mask": mask}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
