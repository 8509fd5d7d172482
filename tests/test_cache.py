"""The encode-once cache: one format for both backends, reused across runs, rebuilt when stale."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from kandinsky_common.cache import CaptionEntries, EmbeddingCache, block_rows, fill_cache
from kandinsky_common.errors import UserError
from kandinsky_common.preprocess import caption_choice
from tests.helpers import train_args


def _train(backend, tiny_folders, data, out, cache, **flags):
    import importlib

    from kandinsky_common.flags import parse_config

    prior, decoder = tiny_folders
    args = train_args(prior, decoder, data, out, backend=backend, report_to="none", **flags)
    if cache is not None:
        args += ["--embeddings_cache", str(cache)]
    cfg = parse_config(args, "prior")
    return importlib.import_module(f"{backend}_kandinsky.training.loop").train(cfg, "prior")


def _stamps(folder) -> dict[str, int]:
    """Every file of a cache folder and when it was last written."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cache_is_shared_reused_and_exact(tiny_folders, sample_dataset, tmp_path):
    cache = tmp_path / "cache"
    plain = _train("flax", tiny_folders, sample_dataset, tmp_path / "a", None)
    first = _train("flax", tiny_folders, sample_dataset, tmp_path / "b", cache)
    manifest = (cache / "manifest.json").read_text()
    stamps = _stamps(cache)
    again = _train("flax", tiny_folders, sample_dataset, tmp_path / "c", cache)
    import jax

    # One torch process sees the flax run's global batch (2 per device).
    batch = 2 * jax.device_count()
    torch_run = _train(
        "torch", tiny_folders, sample_dataset, tmp_path / "d", cache, train_batch_size=batch
    )
    # Reused, not rewritten, by a second flax run and by the torch backend.
    assert _stamps(cache) == stamps
    assert (cache / "manifest.json").read_text() == manifest
    assert json.loads(manifest)["num_rows"] == 32
    c = EmbeddingCache(cache)
    assert c.missing().size == 0
    assert set(c.specs) == {"text_embeds", "text_hidden_states", "text_mask", "image_embeds"}
    for run in (first, again, torch_run):
        np.testing.assert_allclose(run["losses"], plain["losses"], rtol=1e-5)


def test_block_rows_depend_on_the_row_count_alone():
    assert [block_rows(n) for n in (1, 37, 64, 65, 300, 16384, 16385, 10**7)] == [
        1, 1, 1, 2, 5, 256, 256, 256,
    ]  # fmt: skip


def test_stale_cache_is_rebuilt(tmp_path):
    calls = []

    def encode(rows):
        calls.append(len(rows))
        return {"x": np.stack([np.full(3, r, np.float32) for r in rows])}

    cache = fill_cache(tmp_path / "c", "fp-1", 10, 4, encode)
    # 10 rows: blocks of one row, encoded four at a time (the last chunk padded to the batch)
    assert calls == [4] * 3 and cache.read(np.array([9, 0]))["x"][:, 0].tolist() == [9, 0]
    fill_cache(tmp_path / "c", "fp-1", 10, 4, encode)
    assert calls == [4] * 3  # complete and current: nothing encoded
    fill_cache(tmp_path / "c", "fp-2", 10, 4, encode)
    assert calls == [4] * 6  # another fingerprint: rebuilt


def test_older_format_cache_is_rebuilt(tmp_path, capsys):
    """A format-1 cache (one file per output, no blocks) of the same fingerprint is stale."""
    old = tmp_path / "c"
    old.mkdir()
    np.save(old / "x.npy", np.zeros((10, 3), np.float32))
    np.save(old / "done.npy", np.ones(10, bool))
    manifest = {"fingerprint": "fp", "num_rows": 10, "specs": {"x": [[3], "<f4"]}, "format": 1}
    (old / "manifest.json").write_text(json.dumps(manifest))
    cache = fill_cache(old, "fp", 10, 4, lambda r: {"x": r[:, None] + np.zeros(3)})
    assert "rebuilding it" in capsys.readouterr().out
    assert not (old / "x.npy").exists() and not (old / "done.npy").exists()
    assert cache.manifest["format"] == 3 and cache.read([7, 2])["x"][:, 0].tolist() == [7, 2]


def _encoder(log):
    """A deterministic encoder whose rows do not depend on the rest of the batch; `log` gets
    the rows of every call."""

    def encode(rows):
        log.append(rows.copy())
        return {"x": rows[:, None] * 1.5 + np.arange(3), "m": rows % 2 == 0}

    return encode


@pytest.mark.parametrize("num_rows", [37, 300])
def test_processes_fill_their_blocks_into_the_same_files(tmp_path, num_rows):
    """Two processes (threads sharing a barrier) fill the cache one process fills, byte for
    byte, each encoding its own blocks."""
    barrier = threading.Barrier(2, timeout=60)
    logs, caches, errors = ([], []), [None, None], []

    def process(i):
        try:
            caches[i] = fill_cache(
                tmp_path / "two", "fp", num_rows, 4, _encoder(logs[i]),
                process_index=i, process_count=2, barrier=barrier.wait,
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    one = fill_cache(tmp_path / "one", "fp", num_rows, 4, _encoder([]))
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    mine = [set(np.concatenate(log).tolist()) for log in logs]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(num_rows))
    assert all(len(rows) == 4 for log in logs for rows in log)  # one shape for the encoder
    rows = np.array([num_rows - 1, 0, 5, 5, 17])
    for c in (*caches, one):
        out = c.read(rows)
        np.testing.assert_array_equal(out["x"], (rows[:, None] * 1.5 + np.arange(3)))
        assert out["x"].dtype == np.float32 and out["m"].tolist() == (rows % 2 == 0).tolist()


def test_interrupted_fill_resumes_unfinished_blocks(tmp_path):
    """A killed fill keeps the blocks it marked done; a block without its marker is redone."""
    calls = []
    encode = _encoder(calls)

    def dying(rows):
        if len(calls) == 7:  # 300 rows: blocks of 5, 2 calls a block; dies inside block 3
            raise KeyboardInterrupt
        return encode(rows)

    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        fill_cache(folder, "fp", 300, 4, dying)
    assert sorted(p.name for p in (folder / "done").iterdir()) == ["000000", "000001", "000002"]
    (folder / "done" / "000001").unlink()  # as if killed between its files and its marker
    kept = {k: v for k, v in _stamps(folder).items() if "000000" in k or "000002" in k}
    calls.clear()
    cache = fill_cache(folder, "fp", 300, 4, encode)
    encoded = set(np.concatenate(calls).tolist())
    assert encoded == set(range(5, 10)) | set(range(15, 300))
    assert {k: v for k, v in _stamps(folder).items() if k in kept} == kept
    assert cache.missing().size == 0
    np.testing.assert_array_equal(cache.read(np.arange(300))["x"][:, 0], np.arange(300) * 1.5)


def test_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other files"):
        fill_cache(tmp_path / "c", "fp", 4, 2, lambda r: {"x": r[:, None] * 1.0})
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def _list_caption_data(folder):
    from PIL import Image

    folder.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (64, 64), (i * 40, 90, 255 - i * 40)).save(folder / f"{i}.png")
        names = ["red", "crimson", "a painting of a red", "scarlet"][: 1 + i % 4]
        rows.append({"file_name": f"{i}.png", "text": [f"{n} square {i}" for n in names]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_list_captions_cache_every_caption_and_train_as_uncached(tiny_folders, tmp_path):
    """One caption is drawn per row and epoch: the cache holds them all and reads the draw."""
    import jax

    data = _list_caption_data(tmp_path / "data")
    cache = tmp_path / "cache"
    plain = _train("flax", tiny_folders, data, tmp_path / "a", None)
    cached = _train("flax", tiny_folders, data, tmp_path / "b", cache)
    batch = 2 * jax.device_count()
    torch_run = _train("torch", tiny_folders, data, tmp_path / "c", cache, train_batch_size=batch)
    c = EmbeddingCache(cache)
    assert c.caption_counts.tolist() == [1, 2, 3, 4, 1, 2]
    assert c.offsets[-1] == 13 and set(c.entry_keys) <= set(c.specs)
    # Every caption's text was encoded: no two entries of a row are the same.
    for r, n in enumerate(c.caption_counts):
        own = c.read(np.full(n, r), np.arange(n))["text_embeds"]
        assert len({x.tobytes() for x in own}) == len(own)
    for run in (cached, torch_run):
        np.testing.assert_allclose(run["losses"], plain["losses"], rtol=1e-5)
    # The runs' epochs draw other captions than the first, so a wrong read would show above.
    draws = [caption_choice(0, e, r, n) for e in range(4) for r, n in enumerate(c.caption_counts)]
    assert any(draws)


def test_cache_reads_each_rows_drawn_caption(tmp_path):
    counts = np.array([1, 3, 2])

    def encode_rows(rows):
        return {"img": rows[:, None] * 1.0, "txt": rows[:, None] * 0.0}

    def encode_captions(rows, choices):
        return {"txt": (10 * rows + choices)[:, None] * 1.0}

    captions = CaptionEntries(counts=counts, keys=("txt",), encode=encode_captions)
    c = fill_cache(tmp_path / "c", "fp", 3, 2, encode_rows, captions=captions)
    assert c.offsets.tolist() == [0, 1, 4, 6]
    out = c.read(np.array([2, 1, 1, 0]), np.array([1, 2, 0, 0]))
    assert out["txt"][:, 0].tolist() == [21, 12, 10, 0]
    assert out["img"][:, 0].tolist() == [2, 1, 1, 0]
    # one-row blocks encoded several to a chunk: each block keeps its own rows' captions
    many = CaptionEntries(counts=1 + np.arange(9) % 3, keys=("txt",), encode=encode_captions)
    c = fill_cache(tmp_path / "d", "fp", 9, 8, encode_rows, captions=many)
    rows = np.repeat(np.arange(9), many.counts)
    choices = np.concatenate([np.arange(n) for n in many.counts])
    assert c.read(rows, choices)["txt"][:, 0].tolist() == (10 * rows + choices).tolist()


def test_caption_blocks_hold_their_rows_entries(tmp_path):
    """Blocks of several rows: a block's entry files hold every caption of its rows."""
    counts = 1 + np.arange(150) % 4  # 150 rows: blocks of 3 rows, 6 to 8 captions each

    def encode_captions(rows, choices):
        return {"txt": (10 * rows + choices)[:, None] * 1.0}

    captions = CaptionEntries(counts=counts, keys=("txt",), encode=encode_captions)
    c = fill_cache(
        tmp_path / "c", "fp", 150, 4, lambda r: {"img": r[:, None] * 1.0}, captions=captions
    )
    assert c.offsets[-1] == counts.sum() and c.manifest["entry_keys"] == ["txt"]
    block = np.load(tmp_path / "c" / "blocks" / "txt" / "000001.npy")
    assert block[:, 0].tolist() == [30, 31, 32, 33, 40, 50, 51]  # rows 3, 4, 5
    rows = np.array([149, 3, 77, 77, 0])
    choices = np.array([0, 0, 1, 0, 0])
    out = c.read(rows, choices)
    assert out["txt"][:, 0].tolist() == (10 * rows + choices).tolist()
    assert out["img"][:, 0].tolist() == rows.tolist()
