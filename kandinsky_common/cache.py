"""Encode-once cache of frozen-encoder outputs, shared by both backends (framework-free).

Layout of `--embeddings_cache DIR`: `manifest.json` (fingerprint, stage, row count, array specs),
one `<key>.npy` per encoder output holding every dataset row (memory-mapped, reference layout:
NCHW latents), and `done.npy`, a bool per row. Rows are filled by an encode pass before training
and read by index afterwards; the fingerprint (encoder weights, preprocessing, data, precision)
makes a stale cache rebuild itself instead of feeding wrong embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kandinsky_common.errors import UserError

MANIFEST = "manifest.json"
DONE = "done.npy"
_SAMPLES = 64  # chunks hashed per weights file
_CHUNK = 1 << 16


def file_digest(path: Path) -> str:
    """sha256 of a file's size and 64 evenly spread 64 KiB chunks (plus its head and tail).

    A full hash of multi-GB encoder weights would cost more than it protects; any retrained,
    re-saved or other checkpoint differs in these samples.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        offsets = {0, max(0, size - _CHUNK)}
        offsets |= {size * i // _SAMPLES for i in range(_SAMPLES)}
        for off in sorted(offsets):
            f.seek(off)
            h.update(f.read(_CHUNK))
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """Digest of every file of a model/tokenizer folder (names, and contents as above)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(file_digest(p).encode())
    return h.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class EmbeddingCache:
    """Rows of encoder outputs by dataset index; see `fill_cache` for how it is made."""

    def __init__(self, folder: Path, mode: str = "r"):
        self.folder = folder
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.arrays = {
            k: np.load(folder / f"{k}.npy", mmap_mode=mode) for k in self.manifest["specs"]
        }
        self.done = np.load(folder / DONE, mmap_mode=mode)

    @staticmethod
    def check_folder(folder: Path) -> None:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--embeddings_cache {folder} is a file; pass a folder")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise UserError(
                f"--embeddings_cache {folder} holds other files; pass an empty or new folder"
            )

    @classmethod
    def existing(cls, folder: Path, fp: str, num_rows: int, mode: str = "r"):
        """The cache in `folder` if it was made for `fp`, else None (absent or stale)."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("fingerprint") != fp or manifest.get("num_rows") != num_rows:
            return None
        return cls(folder, mode)

    @classmethod
    def create(cls, folder: Path, fp: str, num_rows: int, first: dict[str, np.ndarray]):
        """A new, empty cache whose arrays are shaped like the rows of `first`."""
        if folder.exists():
            print(f"embeddings cache {folder} is stale (encoders, data or settings changed)")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        specs = {}
        for k, v in first.items():
            v = np.asarray(v)
            dtype = np.dtype(bool) if v.dtype == bool else np.dtype(np.float32)
            np.lib.format.open_memmap(
                folder / f"{k}.npy", "w+", dtype, (num_rows, *v.shape[1:])
            ).flush()
            specs[k] = [list(v.shape[1:]), dtype.str]
        np.save(folder / DONE, np.zeros(num_rows, bool))
        manifest = {"fingerprint": fp, "num_rows": num_rows, "specs": specs, "format": 1}
        # The manifest last: a folder without one is not a cache and is rebuilt.
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return cls(folder, "r+")

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~np.asarray(self.done))

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        for k, arr in self.arrays.items():
            arr[rows] = np.asarray(values[k]).astype(arr.dtype)
            arr.flush()
        # Marked done only after the data is flushed: a crash mid-write recomputes the rows.
        self.done[rows] = True
        self.done.flush()

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(arr[rows]) for k, arr in self.arrays.items()}


def fill_cache(
    folder: str | os.PathLike,
    fp: str,
    num_rows: int,
    batch_size: int,
    encode_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
) -> EmbeddingCache:
    """Encode every row not yet cached, `batch_size` rows at a time (the last chunk is padded
    with repeats so the encoder always sees one shape), and return the complete cache."""
    folder = Path(folder).expanduser()
    EmbeddingCache.check_folder(folder)
    cache = EmbeddingCache.existing(folder, fp, num_rows, mode="r+")
    todo = np.arange(num_rows) if cache is None else cache.missing()
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        padded = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
        out = {k: np.asarray(v)[: len(rows)] for k, v in encode_rows(padded).items()}
        if cache is None:
            cache = EmbeddingCache.create(folder, fp, num_rows, out)
        cache.write(rows, out)
        if progress is not None:
            progress(len(rows))
    return EmbeddingCache(folder, "r")
