"""The encode-once cache: one format for both backends, reused across runs, rebuilt when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kandinsky_common.cache import EmbeddingCache, fill_cache
from kandinsky_common.cli import main
from kandinsky_common.errors import UserError
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


def test_list_captions_are_refused(tiny_folders, tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"red {i}", f"crimson {i}"]})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prior, decoder = tiny_folders
    args = train_args(prior, decoder, data, tmp_path / "out", backend="flax")
    assert main("prior", args + ["--embeddings_cache", str(tmp_path / "cache")]) == 2
    assert "one caption per image" in capsys.readouterr().err
