"""The encode-once cache: one format for both backends, reused across runs, rebuilt when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kandinsky_common.cache import CaptionEntries, EmbeddingCache, fill_cache
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


def test_cache_is_shared_reused_and_exact(tiny_folders, sample_dataset, tmp_path):
    cache = tmp_path / "cache"
    plain = _train("flax", tiny_folders, sample_dataset, tmp_path / "a", None)
    first = _train("flax", tiny_folders, sample_dataset, tmp_path / "b", cache)
    manifest = (cache / "manifest.json").read_text()
    stamp = (cache / "done.npy").stat().st_mtime_ns
    again = _train("flax", tiny_folders, sample_dataset, tmp_path / "c", cache)
    import jax

    # One torch process sees the flax run's global batch (2 per device).
    batch = 2 * jax.device_count()
    torch_run = _train(
        "torch", tiny_folders, sample_dataset, tmp_path / "d", cache, train_batch_size=batch
    )
    # Reused, not rewritten, by a second flax run and by the torch backend.
    assert (cache / "done.npy").stat().st_mtime_ns == stamp
    assert (cache / "manifest.json").read_text() == manifest
    assert json.loads(manifest)["num_rows"] == 32
    c = EmbeddingCache(cache)
    assert c.missing().size == 0
    assert set(c.arrays) == {"text_embeds", "text_hidden_states", "text_mask", "image_embeds"}
    for run in (first, again, torch_run):
        np.testing.assert_allclose(run["losses"], plain["losses"], rtol=1e-5)


def test_stale_cache_is_rebuilt(tmp_path):
    calls = []

    def encode(rows):
        calls.append(len(rows))
        return {"x": np.stack([np.full(3, r, np.float32) for r in rows])}

    cache = fill_cache(tmp_path / "c", "fp-1", 10, 4, encode)
    assert calls == [4, 4, 4] and cache.read(np.array([9, 0]))["x"][:, 0].tolist() == [9, 0]
    fill_cache(tmp_path / "c", "fp-1", 10, 4, encode)
    assert calls == [4, 4, 4]  # complete and current: nothing encoded
    fill_cache(tmp_path / "c", "fp-2", 10, 4, encode)
    assert calls == [4, 4, 4] * 2  # another fingerprint: rebuilt


def test_interrupted_fill_resumes_missing_rows(tmp_path):
    def encode(rows):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(rows.copy())
        return {"x": rows[:, None].astype(np.float32)}

    seen = []
    with pytest.raises(KeyboardInterrupt):
        fill_cache(tmp_path / "c", "fp", 8, 4, encode)
    seen.append(None)  # let the next calls through
    cache = fill_cache(tmp_path / "c", "fp", 8, 4, encode)
    assert cache.missing().size == 0
    assert [list(r) for r in seen[2:]] == [[4, 5, 6, 7]]  # only the rows never written


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
    assert c.arrays["text_hidden_states"].shape[0] == 13 and c.arrays["image_embeds"].shape[0] == 6
    # Every caption's text was encoded: no two entries of a row are the same.
    states = np.asarray(c.arrays["text_embeds"])
    for r in range(6):
        own = states[c.offsets[r] : c.offsets[r + 1]]
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
