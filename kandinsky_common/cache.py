"""Encode-once cache of frozen-encoder outputs, shared by both backends (framework-free).

Layout of `--embeddings_cache DIR` (a local folder or a gs:// URL), format 3: the N dataset rows
are cut into blocks of `block_rows(N)` rows, and `blocks/<key>/<b:06d>.npy` holds block b's rows
of encoder output `key` (reference layout: NCHW latents; float32 or bool). `done/<b:06d>` marks a
block whose files are all written, `fill.json` (fingerprint, N, block rows) names whose blocks
these are while they are made, and `manifest.json` (plus its array specs), written last, makes
the folder a complete cache. The fingerprint (encoder weights, preprocessing, data, precision)
makes a stale cache rebuild itself instead of feeding wrong embeddings.

Every process of a run encodes its share of the blocks (block b goes to process b % count), and
the blocks depend on N alone, so a cache filled by any number of processes holds the same bytes.

A caption column of lists (several captions per image, one drawn per epoch) caches every caption:
the text outputs (`CaptionEntries.keys`) then hold one entry per caption, rows' entries
contiguous from `offsets.npy` (N + 1 int64), a block's files the entries of its rows, and a read
names the caption each row trains on.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kandinsky_common.errors import UserError
from kandinsky_common.storage import is_url, location

MANIFEST = "manifest.json"
FILL = "fill.json"
OFFSETS = "offsets.npy"
BLOCKS = "blocks"
DONE = "done"
FORMAT = 3
_SAMPLES = 64  # chunks hashed per weights file
_CHUNK = 1 << 16
_OPEN_BLOCKS = 512  # memory-mapped block files kept open by a local cache
_HEAD = 1024  # bytes fetched to parse a remote block's npy header (np.save pads it to 64 or 128)


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


def block_rows(num_rows: int) -> int:
    """Rows per block: at least 64 blocks to share among processes (small data sets), at most
    256 rows so a block is a cheap unit of work to redo; a function of N alone, so the files are
    the same whatever the number of processes that fill them."""
    return min(256, max(1, math.ceil(num_rows / 64)))


def _root(folder: str | os.PathLike):
    return location(folder if is_url(folder) else Path(folder).expanduser())


def _block_name(b: int) -> str:
    return f"{b:06d}"


def _read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path, data: bytes) -> None:
    """The whole file in one write: an object store then never shows part of it."""
    if not is_url(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _stored(v) -> np.ndarray:
    v = np.asarray(v)
    return v.astype(bool if v.dtype == bool else np.float32, copy=False)


def _current(meta: dict | None, fp: str, num_rows: int) -> bool:
    """Whether a manifest or fill.json describes blocks of this fingerprint and row count (an
    older format has no `block_rows`: stale)."""
    return (
        meta is not None
        and meta.get("fingerprint") == fp
        and meta.get("num_rows") == num_rows
        and meta.get("block_rows") == block_rows(num_rows)
    )


def _npy_header(f) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of the npy file `f` reads (ValueError if it ends first)."""
    major, _ = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("the cache writes C-order blocks only")
    return f.tell(), shape, dtype


class EmbeddingCache:
    """Rows of encoder outputs by dataset index, read from a complete cache (see `fill_cache`)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = folder
        self.root = _root(folder)
        self.manifest = json.loads((self.root / MANIFEST).read_text())
        self.num_rows = self.manifest["num_rows"]
        self.block_rows = self.manifest["block_rows"]
        self.specs = {
            k: (tuple(shape), np.dtype(dt)) for k, (shape, dt) in self.manifest["specs"].items()
        }
        # Keys held per caption entry, and where each row's entries start (lists of captions).
        self.entry_keys = tuple(self.manifest.get("entry_keys", ()))
        self.offsets = None
        if self.entry_keys:
            with (self.root / OFFSETS).open("rb") as f:
                self.offsets = np.load(io.BytesIO(f.read()))
        # Captions per row of a cache made from lists of captions, else None.
        self.caption_counts = None if self.offsets is None else np.diff(self.offsets)
        self._lock = threading.Lock()
        self._open: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._headers: dict[tuple[str, int], tuple[int, tuple[int, ...], np.dtype]] = {}
        self._fs = self._base = None
        if is_url(folder):
            import fsspec

            self._fs, self._base = fsspec.core.url_to_fs(str(self.root))

    @staticmethod
    def check_folder(folder: str | os.PathLike) -> None:
        root = _root(folder)
        if root.exists() and not root.is_dir():
            raise UserError(f"--embeddings_cache {folder} is a file; pass a folder")
        if (
            root.is_dir()
            and any(root.iterdir())
            and not (root / MANIFEST).is_file()
            and not (root / FILL).is_file()
        ):
            raise UserError(
                f"--embeddings_cache {folder} holds other files; pass an empty or new folder"
            )

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_rows / self.block_rows)

    def missing(self) -> np.ndarray:
        """Blocks without their done marker (none in a complete cache)."""
        return np.setdiff1d(np.arange(self.num_blocks), _done_blocks(self.root))

    def _path(self, key: str, b: int):
        return self.root / BLOCKS / key / f"{_block_name(b)}.npy"

    def _block(self, key: str, b: int) -> np.ndarray:
        """Block b of `key`, memory-mapped (the least recently read ones are closed)."""
        with self._lock:
            arr = self._open.get((key, b))
            if arr is not None:
                self._open.move_to_end((key, b))
                return arr
        arr = np.load(str(self._path(key, b)), mmap_mode="r")
        with self._lock:
            self._open[(key, b)] = arr
            while len(self._open) > _OPEN_BLOCKS:
                self._open.popitem(last=False)
        return arr

    def _remote(self, key: str, b: int) -> str:
        return f"{self._base}/{BLOCKS}/{key}/{_block_name(b)}.npy"

    def _fetch_headers(self, files: list[tuple[str, int]]) -> None:
        """Parse the npy headers of block files not seen yet, their first bytes fetched together."""
        new = sorted({f for f in files if f not in self._headers})
        if not new:
            return
        paths = [self._remote(k, b) for k, b in new]
        heads = self._fs.cat_ranges(paths, [0] * len(new), [_HEAD] * len(new), on_error="raise")
        for f, path, head in zip(new, paths, heads):
            try:
                self._headers[f] = _npy_header(io.BytesIO(head))
            except ValueError:  # a header longer than _HEAD: np.save never writes one here
                self._headers[f] = _npy_header(io.BytesIO(self._fs.cat_file(path)))

    def _gather(self, key: str, block: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Rows `local` of blocks `block` of `key`, from the memory-mapped block files."""
        shape, dtype = self.specs[key]
        out = np.empty((len(block), *shape), dtype)
        for b in np.unique(block):
            at = block == b
            out[at] = self._block(key, int(b))[local[at]]
        return out

    def _gather_remote(self, wanted: dict[str, tuple[np.ndarray, np.ndarray]]):
        """Every key's rows in one round of range reads: (block, row in block) per key."""
        files = [(k, int(b)) for k, (block, _) in wanted.items() for b in np.unique(block)]
        with self._lock:
            self._fetch_headers(files)
        paths, starts, ends = [], [], []
        for k, (block, local) in wanted.items():
            shape, dtype = self.specs[k]
            size = dtype.itemsize * math.prod(shape)
            for b, i in zip(block.tolist(), local.tolist()):
                offset = self._headers[(k, b)][0] + i * size
                paths.append(self._remote(k, b))
                starts.append(offset)
                ends.append(offset + size)
        data = self._fs.cat_ranges(paths, starts, ends, on_error="raise") if paths else []
        out, at = {}, 0
        for k, (block, _) in wanted.items():
            shape, dtype = self.specs[k]
            n = len(block)
            raw = b"".join(data[at : at + n])
            out[k] = np.frombuffer(raw, dtype).reshape(n, *shape).copy()
            at += n
        return out

    def read(self, rows, choices=None) -> dict[str, np.ndarray]:
        """Rows' outputs (in the order asked); with lists of captions, the text of caption
        `choices[i]` of row i."""
        rows = np.asarray(rows, np.int64)
        B = self.block_rows
        row_block = rows // B
        wanted = {}
        for k in self.specs:
            if k in self.entry_keys:
                entries = self.offsets[rows] + np.asarray(choices, np.int64)
                wanted[k] = (row_block, entries - self.offsets[row_block * B])
            else:
                wanted[k] = (row_block, rows - row_block * B)
        if self._fs is not None:
            return self._gather_remote(wanted)
        return {k: self._gather(k, block, local) for k, (block, local) in wanted.items()}


def _done_blocks(root) -> np.ndarray:
    done = root / DONE
    if not done.exists():
        return np.zeros(0, np.int64)
    return np.array(sorted(int(p.name) for p in done.iterdir() if p.name.isdigit()), np.int64)


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


def _prepare(root, folder, fp: str, num_rows: int) -> None:
    """Process 0, before any block is written: clear a stale or foreign folder and claim it for
    this fingerprint (fill.json), so that a resumed fill keeps only blocks of the same cache."""
    if _current(_read_json(root / FILL), fp, num_rows) and not (root / MANIFEST).exists():
        return  # an unfinished fill of this cache: its done blocks are kept
    if root.exists() and any(root.iterdir()):
        print(
            f"embeddings cache {folder} was made for other encoders, data or settings, or "
            "is incomplete: rebuilding it"
        )
        root.rmtree()
    meta = {"fingerprint": fp, "num_rows": num_rows, "block_rows": block_rows(num_rows)}
    if not is_url(root):
        root.mkdir(parents=True, exist_ok=True)
    _write(root / FILL, (json.dumps(meta, indent=2) + "\n").encode())


def _encode_blocks(blocks, num_rows, batch_size, encode_rows, captions) -> list[dict]:
    """Each block's outputs (its rows' per row, and with `captions` its rows' entries' text),
    the blocks' rows encoded together: blocks smaller than a batch do not each pay for one."""
    B = block_rows(num_rows)
    spans = [np.arange(b * B, min((b + 1) * B, num_rows)) for b in blocks]
    rows = np.concatenate(spans)
    out = _encode_padded(encode_rows, batch_size, rows)
    row_cuts = np.cumsum([len(s) for s in spans])[:-1]
    per_block = [dict() for _ in blocks]
    for k, v in out.items():
        if captions is not None and k in captions.keys:
            continue
        for i, piece in enumerate(np.split(v, row_cuts)):
            per_block[i][k] = piece
    if captions is None:
        return per_block
    counts = captions.counts[rows]
    offsets = captions.offsets
    entries = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
    choices = entries - np.repeat(offsets[rows], counts)
    text = _encode_padded(captions.encode, batch_size, np.repeat(rows, counts), choices)
    entry_cuts = [int(counts[:c].sum()) for c in np.cumsum([len(s) for s in spans])[:-1]]
    for k, v in text.items():
        for i, piece in enumerate(np.split(v, entry_cuts)):
            per_block[i][k] = piece
    return per_block


def _groups(blocks: list[int], num_rows: int, batch_size: int):
    """This process's pending blocks in runs of at least `batch_size` rows (one encode each)."""
    B, group = block_rows(num_rows), []
    for b in blocks:
        group.append(b)
        if sum(min(B, num_rows - x * B) for x in group) >= batch_size:
            yield group
            group = []
    if group:
        yield group


def _write_manifest(root, fp: str, num_rows: int, captions: CaptionEntries | None) -> None:
    """The manifest last, its specs from block 0's headers: it makes the folder a cache."""
    specs = {}
    if num_rows:
        for key in sorted(p.name for p in (root / BLOCKS).iterdir()):
            with (root / BLOCKS / key / f"{_block_name(0)}.npy").open("rb") as f:
                _, shape, dtype = _npy_header(f)
            specs[key] = [list(shape[1:]), dtype.str]
    manifest = {
        "fingerprint": fp,
        "num_rows": num_rows,
        "block_rows": block_rows(num_rows),
        "specs": specs,
        "format": FORMAT,
    }
    if captions is not None:
        _write(root / OFFSETS, _npy_bytes(captions.offsets))
        manifest["entry_keys"] = sorted(captions.keys)
    _write(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def fill_cache(
    folder: str | os.PathLike,
    fp: str,
    num_rows: int,
    batch_size: int,
    encode_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
    captions: CaptionEntries | None = None,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> EmbeddingCache:
    """The complete cache of `fp` in `folder`, encoding what it lacks: this process encodes the
    blocks b with b % process_count == process_index not done yet, runs of them together,
    `batch_size` rows at a time (the last chunk padded with repeats so the encoder always sees
    one shape). With
    `captions`, every caption of those rows is encoded too, `batch_size` captions at a time.
    Every process calls it (`barrier` waits for all of them); process 0 writes the manifest."""
    root = _root(folder)
    # Every process gets the same answers here: nothing writes the folder before the barrier.
    EmbeddingCache.check_folder(folder)
    if _current(_read_json(root / MANIFEST), fp, num_rows):
        return EmbeddingCache(folder)
    barrier()  # every process has looked: process 0 may clear the folder
    if process_index == 0:
        _prepare(root, folder, fp, num_rows)
    barrier()  # fill.json is current: blocks may be written
    num_blocks = math.ceil(num_rows / block_rows(num_rows))
    done = set(_done_blocks(root).tolist())
    mine = [b for b in range(process_index, num_blocks, process_count) if b not in done]
    for group in _groups(mine, num_rows, batch_size):
        outs = _encode_blocks(group, num_rows, batch_size, encode_rows, captions)
        for b, out in zip(group, outs):
            for key, value in out.items():
                _write(root / BLOCKS / key / f"{_block_name(b)}.npy", _npy_bytes(_stored(value)))
            # Marked done once its files are whole: a fill killed mid-block redoes the block.
            _write(root / DONE / _block_name(b), b"")
            if progress is not None:
                progress(min(num_rows - b * block_rows(num_rows), block_rows(num_rows)))
    barrier()  # every block done
    if process_index == 0:
        _write_manifest(root, fp, num_rows, captions)
    barrier()
    return EmbeddingCache(folder)
