"""The training split, loaded the way the diffusers scripts load it, and checked before any compile.

`--dataset_name` names a local dataset folder (anything `datasets.load_dataset` reads, or a folder
written by `save_to_disk`), a single data file, or a hub dataset that is already in the datasets
cache; `--train_data_dir` is an imagefolder with metadata.jsonl/metadata.csv for the captions. The
hub itself is never contacted: this project runs where it is unreachable, and an online attempt
costs ~25 s of retries before failing anyway.

Every problem a user can fix (missing folder, no images, wrong column, bad caption, a truncated or
unreadable image) is a UserError raised here, from cheap metadata and text-column scans and a
structural check of each image file (header and end marker); images are decoded only when a batch
needs them (see kandinsky_common.preprocess).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kandinsky_common.errors import UserError
from kandinsky_common.storage import files_under, is_url, location

if TYPE_CHECKING:
    import datasets

# Single files that `--dataset_name` may point at, and the datasets builder that reads each.
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}
# How many path-valued image cells are checked for existence at load time; the rest are checked
# when decoded (decode_image raises the same kind of error), so huge path lists load quickly.
PATH_CHECK_LIMIT = 1000
# How many images get the structural check (header parsed, format's end marker present) at load
# time: ~0.2 ms each on a local disk. Beyond it, a damaged image is named when its batch is built.
IMAGE_CHECK_LIMIT = 20_000
# The bytes each format ends with; an interrupted download or copy cuts them off.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}


def _import_datasets():
    # datasets reads HF_HUB_OFFLINE once, at import: set it first so no code path (for example a
    # cached hub dataset whose README is re-checked) can wait on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def load_train_dataset(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    cache_dir: str | None,
    image_column: str,
    caption_column: str | None,
    max_train_samples: int | None,
    seed: int | None,
) -> datasets.Dataset:
    """The checked "train" split, shuffled and truncated to max_train_samples like the reference.

    caption_column is None for the decoder, which uses no text. `seed=None` selects the subset with
    seed 0 (the reference draws a fresh random subset): a resumed run must see the same examples.
    """
    if max_train_samples is not None and max_train_samples < 1:
        raise UserError(f"--max_train_samples {max_train_samples} must be at least 1")
    if dataset_name:
        dataset = _load_named(dataset_name, dataset_config_name, cache_dir)
        source = f"--dataset_name {dataset_name!r}"
    elif train_data_dir:
        dataset = _load_imagefolder(train_data_dir, cache_dir)
        source = f"--train_data_dir {train_data_dir!r}"
    else:
        raise UserError(
            "no training data given; pass --dataset_name (a local dataset folder) "
            "or --train_data_dir (a folder of images with metadata.jsonl captions)"
        )
    if len(dataset) == 0:
        raise UserError(f"the train split of {source} has no rows; point it at a non-empty dataset")
    check_columns(dataset, image_column, caption_column, source)
    if max_train_samples is not None:
        seed = 0 if seed is None else seed
        count = min(max_train_samples, len(dataset))
        # In memory: the default writes an indices file next to the data, which for a
        # save_to_disk folder is the user's own directory. Same permutation either way.
        dataset = dataset.shuffle(seed=seed, keep_in_memory=True).select(range(count))
    check_image_files(dataset, image_column)
    return dataset


def check_image_files(dataset: datasets.Dataset, column: str, limit: int = IMAGE_CHECK_LIMIT):
    """Name a truncated or unreadable image before anything is written, not mid-run.

    Per image, PIL parses the header and the file must end with its format's end marker (JPEG,
    PNG, GIF; WebP: the RIFF size must fit). Only an image failing that is decoded in full, so one
    with harmless bytes after its end marker still passes. A full decode of every image would cost
    a pass over the data (minutes for large sets); damage inside an otherwise whole file is found
    when its batch is built, with the same message.
    """
    from kandinsky_common.preprocess import decode_image

    kind = image_column_kind(dataset.features[column])
    values = _arrow_column(dataset, column)
    for row in range(min(len(values), limit)):
        cell = values[row].as_py()
        if kind == "path":
            path, data = cell, None
        elif kind == "bytes":
            path, data = None, cell
        else:
            path, data = cell.get("path"), cell.get("bytes")
        if not _looks_whole(path, data):
            decode_image(cell, row)  # raises the UserError naming the file and the reason


def _looks_whole(path: str | None, data: bytes | None) -> bool:
    from PIL import Image

    try:
        f = io.BytesIO(data) if data is not None else open(os.path.expanduser(path), "rb")
        with f:
            with Image.open(f) as image:
                fmt = image.format
            size = f.seek(0, os.SEEK_END)
            if fmt == "WEBP":
                f.seek(4)
                return size >= int.from_bytes(f.read(4), "little") + 8
            marker = _END_MARKERS.get(fmt)
            if marker is None:
                return True  # no end marker to check: found when decoded, if damaged
            f.seek(max(0, size - 64))
            return f.read().rstrip(b"\0\r\n ").endswith(marker)
    except Exception:  # unreadable, not an image, no path: decode_image says which
        return False


def _looks_like_hub_name(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def _load_url(name: str, config_name: str | None, cache_dir: str | None) -> datasets.Dataset:
    """A dataset in a bucket (a save_to_disk folder, or parquet files under the prefix), read
    from a local copy: datasets' offline mode refuses remote files, and the arrow files it maps
    must stay for the whole run. The copy lives under the datasets cache, one per URL, and a
    file already there with the bucket's size is not fetched again."""
    import hashlib

    local = Path(
        cache_dir or os.path.expanduser("~/.cache/kandinsky_finetune/datasets"),
        "gs-" + hashlib.sha256(name.encode()).hexdigest()[:16],
    )
    try:
        files = files_under(name)
        for rel in files:
            target, source = local / rel, location(name) / rel
            stat = source.stat()
            seen = target.stat() if target.is_file() else None
            if seen and (seen.st_size, int(seen.st_mtime)) == (stat.length, int(stat.mtime)):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            os.utime(target, (stat.mtime, stat.mtime))  # the bucket's time: a changed file differs
    except Exception as e:  # credentials, network, a missing bucket: the library's words
        raise UserError(f"--dataset_name {name!r} cannot be read ({_brief(e)})") from e
    if _is_saved_to_disk(local):
        return _load_saved(local, config_name)
    parquet = sorted(str(local / f) for f in files if f.endswith(".parquet"))
    if not parquet:
        raise UserError(
            f"--dataset_name {name!r} holds no parquet files and no save_to_disk folder; point it "
            "at one of those (datasets' to_parquet or save_to_disk write them)"
        )
    what = f"--dataset_name {name!r}"
    loaded = _call_load("parquet", None, cache_dir, what, data_files={"train": parquet})
    return _train_split(loaded, name)


def _load_named(name: str, config_name: str | None, cache_dir: str | None) -> datasets.Dataset:
    if is_url(name):
        return _load_url(name, config_name, cache_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_saved_to_disk(path):
            return _load_saved(path, config_name)
        return _train_split(
            _call_load(str(path), config_name, cache_dir, f"--dataset_name {name!r}"), name
        )
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            kinds = ", ".join(sorted(FILE_BUILDERS))
            raise UserError(
                f"--dataset_name {name!r} is a file of an unknown kind; pass a dataset folder "
                f"or a {kinds} file"
            )
        files = {"train": str(path)}
        loaded = _call_load(builder, None, cache_dir, f"--dataset_name {name!r}", data_files=files)
        return _train_split(loaded, name)
    if not _looks_like_hub_name(name):
        raise UserError(f"--dataset_name folder {name!r} does not exist; check the path")
    datasets = _import_datasets()
    packaged = getattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES", {})
    if name in packaged:
        raise UserError(
            f"--dataset_name {name!r} is a datasets file format, not a dataset; pass the folder "
            "holding the data as --dataset_name (or a folder of images as --train_data_dir)"
        )
    hint = (
        f"the Hugging Face hub is not reachable from here and {name!r} is neither a local folder "
        "nor in the datasets cache; download the dataset elsewhere and pass its local folder as "
        "--dataset_name (or your images as --train_data_dir)"
    )
    if not datasets.config.HF_HUB_OFFLINE:
        # datasets was imported before offline mode could be set: trying would hit the network.
        raise UserError(hint)
    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as e:
        raise UserError(hint) from e
    except Exception as e:
        raise UserError(f"cached dataset {name!r} could not be loaded ({_brief(e)}); {hint}") from e
    return _train_split(loaded, name)


def _is_saved_to_disk(path: Path) -> bool:
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _load_saved(path: Path | str, config_name: str | None) -> datasets.Dataset:
    if config_name:
        raise UserError(
            f"--dataset_config_name {config_name!r} does not apply to {str(path)!r}, a folder "
            "written by save_to_disk (it has splits, not configs); drop the flag"
        )
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(
            f"{str(path)!r} looks like a save_to_disk folder but cannot be read ({_brief(e)}); "
            "save the dataset again"
        ) from e
    return _train_split(loaded, str(path))


def _call_load(path: str, config_name: str | None, cache_dir: str | None, what: str, **kwargs):
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(path, config_name, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        # Anything failing here is about the user's files (bad config name, unreadable metadata,
        # mixed formats): one line instead of a datasets traceback.
        raise UserError(f"{what} could not be loaded: {_brief(e)}; fix or replace the data") from e


def _brief(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _train_split(loaded, name: str) -> datasets.Dataset:
    datasets = _import_datasets()
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" not in loaded:
        splits = ", ".join(loaded) or "none"
        raise UserError(
            f"dataset {name!r} has no 'train' split (splits: {splits}); rename the split you want "
            "to train on to 'train' or save that split alone"
        )
    return loaded["train"]


_DATASET_FILES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def _looks_like_a_dataset(root: Path) -> bool:
    """Data files or a save_to_disk folder: what --dataset_name reads."""
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        return True
    return any(
        os.path.splitext(f)[1].lower() in _DATASET_FILES
        for _, _, files in os.walk(root)
        for f in files
    )


def _load_imagefolder(train_data_dir: str, cache_dir: str | None) -> datasets.Dataset:
    root = Path(train_data_dir).expanduser()
    if not root.exists():
        raise UserError(f"--train_data_dir {train_data_dir!r} does not exist; check the path")
    if not root.is_dir():
        raise UserError(f"--train_data_dir {train_data_dir!r} is a file; pass the folder of images")
    datasets = _import_datasets()
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    seen_any = False
    has_image = False
    for _, _, files in os.walk(root):
        seen_any = seen_any or bool(files)
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            has_image = True
            break
    if not seen_any:
        raise UserError(
            f"--train_data_dir {train_data_dir!r} is empty; put the training images in it"
        )
    if not has_image:
        if _looks_like_a_dataset(root):
            raise UserError(
                f"--train_data_dir {train_data_dir!r} holds a dataset (parquet/arrow/json "
                "files or a save_to_disk folder), not image files; pass it as --dataset_name "
                f"{train_data_dir!r}"
            )
        raise UserError(
            f"--train_data_dir {train_data_dir!r} holds no image files (.png, .jpg, .webp, ...); "
            "put the training images in it"
        )
    # The reference's call, verbatim: every file under the folder, one "train" split.
    data_files = {"train": os.path.join(str(root), "**")}
    try:
        loaded = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    except Exception as e:
        raise UserError(
            f"--train_data_dir {train_data_dir!r} could not be read as an image folder "
            f"({_brief(e)}); check metadata.jsonl/metadata.csv (a file_name column naming each "
            "image) and the image files"
        ) from e
    return _train_split(loaded, train_data_dir)


def check_columns(
    dataset: datasets.Dataset, image_column: str, caption_column: str | None, source: str
) -> None:
    """Raise a UserError unless the columns exist and hold images and captions."""
    columns = list(dataset.column_names)
    available = ", ".join(columns)
    if image_column not in columns:
        raise UserError(
            f"{source} has no image column {image_column!r} (columns: {available}); "
            "pass --image_column with the column that holds the images"
        )
    if caption_column is not None and caption_column not in columns:
        raise UserError(
            f"{source} has no caption column {caption_column!r} (columns: {available}); "
            "pass --caption_column with the column that holds the captions (for an image folder, "
            "a metadata.jsonl with file_name and text fields)"
        )
    _check_image_column(dataset, image_column)
    if caption_column is not None:
        _check_caption_column(dataset, caption_column)


def image_column_kind(feature) -> str | None:
    """'image', 'path', 'bytes' or 'struct' (a {bytes, path} dict) if the feature holds images."""
    datasets = _import_datasets()
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return "path"
        if feature.dtype in ("binary", "large_binary"):
            return "bytes"
    if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
        return "struct"
    return None


def _arrow_column(dataset: datasets.Dataset, column: str):
    # The arrow view respects select()/shuffle() index mappings and reads no Python objects.
    return dataset.select_columns([column]).with_format("arrow")[column]


def _first_true(mask) -> int | None:
    import pyarrow.compute as pc

    hits = pc.indices_nonzero(pc.fill_null(mask, True))
    return int(hits[0].as_py()) if len(hits) else None


def _check_image_column(dataset: datasets.Dataset, column: str) -> None:
    import pyarrow.compute as pc

    feature = dataset.features[column]
    kind = image_column_kind(feature)
    if kind is None:
        raise UserError(
            f"image column {column!r} holds {feature!r}, not images; pass --image_column with a "
            "column of images (an Image feature, image bytes or image file paths)"
        )
    values = _arrow_column(dataset, column)
    bad = _first_true(pc.is_null(values))
    if bad is not None:
        raise UserError(
            f"row {bad} of image column {column!r} has no image; remove that row from the dataset"
        )
    if kind == "path":
        for row, value in enumerate(values.slice(0, PATH_CHECK_LIMIT).to_pylist()):
            if not os.path.isfile(os.path.expanduser(value)):
                raise UserError(
                    f"row {row} of image column {column!r} names {value!r}, which is not a file; "
                    "image paths must be absolute or relative to the working directory"
                )


def _check_caption_column(dataset: datasets.Dataset, column: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = dataset.features[column]
    values = _arrow_column(dataset, column)
    typ = values.type
    is_text = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    is_list = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and (
        pa.types.is_string(typ.value_type) or pa.types.is_large_string(typ.value_type)
    )
    if not (is_text or is_list):
        raise UserError(
            f"caption column {column!r} holds {feature!r}; captions must be strings or lists of "
            "strings: pass --caption_column with the text column"
        )
    bad = _first_true(pc.is_null(values))
    if bad is not None:
        raise UserError(
            f"row {bad} of caption column {column!r} has no caption; "
            "give it a caption or remove the row"
        )
    if is_list:
        bad = _first_true(pc.equal(pc.list_value_length(values), 0))
        if bad is not None:
            raise UserError(
                f"row {bad} of caption column {column!r} is an empty list of captions; "
                "give it at least one caption or remove the row"
            )
        flat = pc.list_flatten(values)
        parents = pc.list_parent_indices(values)
        first = _first_true(pc.is_null(flat))
        if first is not None:
            row = int(parents[first].as_py())
            raise UserError(
                f"row {row} of caption column {column!r} has a missing caption in its list; "
                "replace it with text or remove it"
            )
