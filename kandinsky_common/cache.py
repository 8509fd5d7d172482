"""Encode-once cache of frozen-encoder outputs, shared by both backends (framework-free).

Layout of `--embeddings_cache DIR`: `manifest.json` (fingerprint, stage, row count, array specs),
one `<key>.npy` per encoder output holding every dataset row (memory-mapped, reference layout:
NCHW latents), and `done.npy`, a bool per row. Rows are filled by an encode pass before training
and read by index afterwards; the fingerprint (encoder weights, preprocessing, data, precision)
makes a stale cache rebuild itself instead of feeding wrong embeddings.

A caption column of lists (several captions per image, one drawn per epoch) caches every caption:
the text outputs (`CaptionEntries.keys`) then hold one entry per caption, rows' entries
contiguous from `offsets.npy` (N + 1 int64), and a read names the caption each row trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kandinsky_common.errors import UserError

MANIFEST = "manifest.json"
DONE = "done.npy"
OFFSETS = "offsets.npy"
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
        # Keys held per caption entry, and where each row's entries start (lists of captions).
        self.entry_keys = tuple(self.manifest.get("entry_keys", ()))
        self.offsets = np.load(folder / OFFSETS) if self.entry_keys else None
        # Captions per row of a cache made from lists of captions, else None.
        self.caption_counts = None if self.offsets is None else np.diff(self.offsets)

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
    def create(
        cls,
        folder: Path,
        fp: str,
        num_rows: int,
        first: dict[str, np.ndarray],
        offsets: np.ndarray | None = None,
        first_entries: dict[str, np.ndarray] | None = None,
    ):
        """A new, empty cache whose arrays are shaped like the rows of `first` (and, with
        `offsets`, per-caption arrays shaped like the entries of `first_entries`)."""
        if folder.exists():
            print(
                f"embeddings cache {folder} was made for other encoders, data or settings, or "
                "is incomplete: rebuilding it"
            )
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        specs = {}
        sized = [(first, num_rows)]
        if offsets is not None:
            sized.append((first_entries, int(offsets[-1])))
        for values, n in sized:
            for k, v in values.items():
                v = np.asarray(v)
                dtype = np.dtype(bool) if v.dtype == bool else np.dtype(np.float32)
                np.lib.format.open_memmap(
                    folder / f"{k}.npy", "w+", dtype, (n, *v.shape[1:])
                ).flush()
                specs[k] = [list(v.shape[1:]), dtype.str]
        np.save(folder / DONE, np.zeros(num_rows, bool))
        manifest = {"fingerprint": fp, "num_rows": num_rows, "specs": specs, "format": 1}
        if offsets is not None:
            np.save(folder / OFFSETS, np.asarray(offsets, np.int64))
            manifest.update(format=2, entry_keys=sorted(first_entries))
        # The manifest last: a folder without one is not a cache and is rebuilt.
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return cls(folder, "r+")

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~np.asarray(self.done))

    def write(
        self,
        rows: np.ndarray,
        values: dict[str, np.ndarray],
        entries: np.ndarray | None = None,
        entry_values: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Store rows' outputs (and, per caption, `entry_values` at `entries`: all of the rows'
        captions) and mark the rows done."""
        for k, arr in self.arrays.items():
            if k in self.entry_keys:
                arr[entries] = np.asarray(entry_values[k]).astype(arr.dtype)
            else:
                arr[rows] = np.asarray(values[k]).astype(arr.dtype)
            arr.flush()
        # Marked done only after the data is flushed: a crash mid-write recomputes the rows.
        self.done[rows] = True
        self.done.flush()

    def read(self, rows: np.ndarray, choices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows' outputs; with lists of captions, the text of caption `choices[i]` of row i."""
        if self.offsets is None:
            return {k: np.asarray(arr[rows]) for k, arr in self.arrays.items()}
        entries = self.offsets[rows] + np.asarray(choices, np.int64)
        return {
            k: np.asarray(arr[entries if k in self.entry_keys else rows])
            for k, arr in self.arrays.items()
        }


@dataclass(frozen=True)
class CaptionEntries:
    """Several captions per row: `counts` (N,) captions per row; `encode(rows, choices)` maps
    the rows' caption numbers to the text outputs `keys` (the rest of the outputs stay per row,
    from `encode_rows`)."""

    counts: np.ndarray
    keys: tuple[str, ...]
    encode: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)


def _encode_padded(encode, batch_size: int, *columns: np.ndarray) -> dict[str, np.ndarray]:
    """encode(*columns) on batch_size entries at a time, the last chunk padded with repeats so
    the encoder always sees one shape; outputs concatenated back to len(columns[0])."""
    n, chunks = len(columns[0]), []
    for start in range(0, n, batch_size):
        part = [c[start : start + batch_size] for c in columns]
        pad = batch_size - len(part[0])
        part = [np.concatenate([c, np.repeat(c[-1:], pad)]) for c in part]
        chunks.append({k: np.asarray(v)[: batch_size - pad] for k, v in encode(*part).items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def fill_cache(
    folder: str | os.PathLike,
    fp: str,
    num_rows: int,
    batch_size: int,
    encode_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
    captions: CaptionEntries | None = None,
) -> EmbeddingCache:
    """Encode every row not yet cached, `batch_size` rows at a time (the last chunk is padded
    with repeats so the encoder always sees one shape), and return the complete cache. With
    `captions`, every caption of those rows is encoded too, `batch_size` captions at a time."""
    folder = Path(folder).expanduser()
    EmbeddingCache.check_folder(folder)
    cache = EmbeddingCache.existing(folder, fp, num_rows, mode="r+")
    todo = np.arange(num_rows) if cache is None else cache.missing()
    offsets = None if captions is None else captions.offsets
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        out = _encode_padded(encode_rows, batch_size, rows)
        entries = entry_out = None
        if captions is not None:
            out = {k: v for k, v in out.items() if k not in captions.keys}
            counts = captions.counts[rows]
            entries = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
            choices = entries - np.repeat(offsets[rows], counts)
            entry_out = _encode_padded(
                captions.encode, batch_size, np.repeat(rows, counts), choices
            )
        if cache is None:
            cache = EmbeddingCache.create(folder, fp, num_rows, out, offsets, entry_out)
        cache.write(rows, out, entries, entry_out)
        if progress is not None:
            progress(len(rows))
    return EmbeddingCache(folder, "r")
