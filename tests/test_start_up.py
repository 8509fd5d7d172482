"""A fresh flax run makes its first batches while the step compiles: the encoders' first compile
and call overlap the step's compile (or the load of its executable) instead of following it. A
set-up that fails after the batches began leaves no thread behind."""

from __future__ import annotations

import json
import subprocess
import sys
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


def _preload_args(tiny_folders, sample_dataset, tmp_path, out: str, **flags):
    prior, decoder = tiny_folders
    flags = {"max_train_steps": 2, "compile_cache_dir": tmp_path / "cache", **flags}
    return train_args(
        prior, decoder, sample_dataset, tmp_path / out, backend="flax", report_to="none", **flags
    )


def test_the_record_is_shared_by_flags_the_step_does_not_read(
    tiny_folders, sample_dataset, tmp_path
):
    from flax_kandinsky.training import start

    def record(**flags):
        args = _preload_args(tiny_folders, sample_dataset, tmp_path, "out", **flags)
        return start.record_path(parse_config(args, "prior"), "prior")

    base = record()
    assert base.parent == tmp_path / "cache" / "kandinsky_steps" / "starts"
    assert record(output_dir=tmp_path / "other", learning_rate=3e-4, max_train_steps=9) == base
    assert record(seed=5, lr_scheduler="cosine", max_grad_norm=0.5, checkpointing_steps=1) == base
    assert record(train_batch_size=4) != base
    assert record(mixed_precision="bf16") != base
    assert record(compile_cache_dir="") is None


def test_a_run_takes_the_step_an_earlier_run_with_its_flags_loaded(
    monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    """The second run with the same flags (another output_dir, LR and length) compiles its step
    on a thread from the first run's record, before the networks are built, and set_up takes it;
    a stale or unreadable record costs only the early load: same losses, record rewritten."""
    from flax_kandinsky.training import start
    from kandinsky_common import cli

    preloads = []
    real_begin = start.begin

    def begin(cfg, stage):
        preload = real_begin(cfg, stage)
        preloads.append(
            (preload, preload.recipe)
        )  # the recipe read, before the run records its own
        return preload

    monkeypatch.setattr(start, "begin", begin)

    def run(out, **flags):
        cfg = parse_config(
            _preload_args(tiny_folders, sample_dataset, tmp_path, out, **flags), "prior"
        )
        summary = cli.backend_train("flax")(cfg, "prior")
        return summary["losses"], *preloads[-1]

    first, preload, read = run("a")
    assert read is None and not preload.taken
    recorded = json.loads(preload.record.read_text())
    assert recorded["key"] and len(recorded["leaves"]) > 10

    again, preload, _ = run("b")
    assert preload.taken and again == first

    _, preload, _ = run("c", learning_rate=3e-4, max_train_steps=3, seed=1)
    assert preload.taken

    # A record naming a program no longer stored: its load fails on the thread, set_up compiles
    # as without a record, and the record is written again.
    preload.record.write_text(json.dumps({**recorded, "key": "0" * 64}))
    again, preload, read = run("d")
    assert read is not None and not preload.taken and again == first
    assert json.loads(preload.record.read_text()) == recorded

    preload.record.write_text('{"key": ')  # cut short
    again, preload, read = run("e")
    assert read is None and not preload.taken and again == first
    assert json.loads(preload.record.read_text()) == recorded


def _python(code: str, cwd) -> str:
    """stdout of `python -c code` in a fresh process (its modules its own), which must exit 0."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_flags_parse_without_importing_transformers(tmp_path):
    # A flax decoder run needs nothing else from transformers; its import would delay the step's
    # early load by a second.
    code = (
        "import sys\n"
        "from kandinsky_common.flags import parse_config\n"
        "cfg = parse_config(['--output_dir', 'o', '--train_data_dir', '.', '--learning_rate', "
        "'3e-5', '--use_ema'], 'decoder')\n"
        "assert cfg.learning_rate == 3e-5 and cfg.use_ema, cfg\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    imported = _python(code, tmp_path).strip()
    assert imported == "[]", imported


def test_the_standalone_parser_is_transformers_own(monkeypatch):
    from transformers import HfArgumentParser

    from kandinsky_common import flags

    monkeypatch.delitem(sys.modules, "transformers")  # as in a fresh process; restored after
    standalone = flags._hf_argument_parser()
    assert standalone.__module__ == "kandinsky_common._hf_argparser"
    argv = ["--output_dir", "o", "--resolution", "64", "--use_ema", "--mixed_precision", "bf16"]
    parsed = [
        parser_class(flags.TrainConfig).parse_args_into_dataclasses(args=argv)[0]
        for parser_class in (standalone, HfArgumentParser)
    ]
    assert parsed[0] == parsed[1]
    cfg = parsed[0]
    assert (cfg.resolution, cfg.use_ema, cfg.mixed_precision) == (64, True, "bf16")


def test_the_parser_falls_back_to_the_transformers_package(tmp_path):
    # A transformers release that keeps hf_argparser.py elsewhere: the package's parser.
    code = (
        "import importlib.util\n"
        "importlib.util.find_spec = lambda name: None\n"
        "from kandinsky_common import flags\n"
        "import transformers\n"
        "assert flags._Parser.__mro__[1] is transformers.HfArgumentParser\n"
        "cfg = flags.parse_config(['--output_dir', 'o', '--train_data_dir', '.'], 'prior')\n"
        "assert cfg.output_dir.endswith('o')\n"
    )
    _python(code, tmp_path)
