"""A fresh flax run makes its first batches while the step compiles: the encoders' first compile
and call overlap the step's compile (or the load of its executable) instead of following it. A
set-up that fails after the batches began leaves no thread behind."""

from __future__ import annotations

import threading

import pytest

from kandinsky_common.flags import parse_config
from tests.helpers import train_args

pytest.importorskip("jax")


def _args(tiny_folders, sample_dataset, tmp_path, **flags):
    prior, decoder = tiny_folders
    return train_args(
        prior, decoder, sample_dataset, tmp_path / "out", backend="flax", report_to="none",
        max_train_steps=2, **flags,
    )  # fmt: skip


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kandinsky-prefetch" and t.is_alive()]


def test_the_first_batch_is_encoded_while_the_step_compiles(
    monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    from flax_kandinsky.training import loop

    encoded = threading.Event()
    real_maker = loop.make_encoder

    def maker(*args, **kw):
        encode = real_maker(*args, **kw)

        def noted(batch):
            out = encode(batch)
            encoded.set()
            return out

        return noted

    seen = []
    real_compile = loop.compile_stored

    def compile_stored(*args, **kw):
        # The step's compile waits (at most a minute) for the first batch's encoder outputs:
        # a loop that encodes only after the step is compiled never gets there in time.
        seen.append(encoded.wait(timeout=60))
        return real_compile(*args, **kw)

    monkeypatch.setattr(loop, "make_encoder", maker)
    monkeypatch.setattr(loop, "compile_stored", compile_stored)
    args = _args(tiny_folders, sample_dataset, tmp_path, compile_cache_dir=tmp_path / "cache")
    summary = loop.train(parse_config(args, "prior"), "prior")
    assert seen == [True]
    assert summary["updates"] == 2 and len(summary["losses"]) == 2
    assert _prefetch_threads() == []


def test_a_set_up_that_fails_after_the_batches_began_stops_them(
    monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    from flax_kandinsky.training import loop

    def compile_stored(*args, **kw):
        assert _prefetch_threads(), "the batches were not begun before the step's compile"
        raise RuntimeError("the step did not compile")

    monkeypatch.setattr(loop, "compile_stored", compile_stored)
    args = _args(tiny_folders, sample_dataset, tmp_path, compile_cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="the step did not compile"):
        loop.train(parse_config(args, "prior"), "prior")
    assert _prefetch_threads() == []
    assert not (tmp_path / "out").exists()  # set-up failed before output_dir was touched
