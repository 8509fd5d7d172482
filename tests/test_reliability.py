"""Crash and damage safety through the real scripts, both backends.

- kill -9 during a step, during a checkpoint write and during the final export: each time
  `--resume_from_checkpoint latest` carries on, and the final weights are bit-identical to an
  uninterrupted run's; a checkpoint that was being written is never taken as "latest".
- a damaged newest checkpoint: 'latest' falls back to the previous one with a warning (and still
  ends bit-identical); asking for the damaged one by name exits 2 naming the damage.
- a non-finite loss stops the run naming the update and keeps the last checkpoint; rerun with
  --skip_nonfinite_updates, such updates change nothing (weights, optimizer, LR position, EMA) and
  are counted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kandinsky_common import checkpoints as ck
from kandinsky_common.cli import main
from tests.helpers import ROOT, run_script, script_env, train_args

SCRIPT = "train_text_to_image_prior.py"
FLAGS = dict(max_train_steps=6, checkpointing_steps=2, train_batch_size=1, report_to="none")
TMP = {
    "torch": re.compile(r"\.checkpoint-(\d+)\.tmp\Z"),
    "flax": re.compile(r"checkpoint-(\d+)\.orbax"),
}
# What the final export of the prior stage writes into output_dir (both backends).
EXPORTED = {"model_index.json", "prior", "text_encoder", "image_encoder", "tokenizer", "scheduler"}


def _weights(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / "prior" / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa), "weights differ"


def _train(backend: str, args: list[str], capsys) -> tuple[str, str]:
    """An uninterrupted run: (stdout, stderr). Torch runs in this process (same numerics, no
    interpreter start-up); flax in a subprocess, so it has one CPU device like the killed runs."""
    if backend == "flax":
        proc = run_script(SCRIPT, *args)
        return proc.stdout, proc.stderr
    capsys.readouterr()
    assert main("prior", args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _kill_when(args: list[str], out: Path, moment, timeout: float = 300) -> set[str]:
    """Run the prior script and SIGKILL it as soon as `moment(new_names, stderr)` holds (stderr: a
    function returning what the script printed there so far), where
    new_names are the names that appeared in output_dir since the previous poll (a rising edge,
    so leftovers of an earlier kill do not count). Returns output_dir's names at the kill."""
    err = out.parent / f"{out.name}.stderr"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / SCRIPT), *args],
            env=script_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    deadline = time.monotonic() + timeout
    before = set(os.listdir(out)) if out.is_dir() else set()
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            now = set(os.listdir(out)) if out.is_dir() else set()
            if moment(now - before, lambda: err.read_text(errors="replace")):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return now
            before = now
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(
        f"the moment never came; exit {proc.returncode}: {err.read_text()[-2000:]}"
    )


def _damage_newest(out: Path, backend: str) -> Path:
    """Truncate the biggest array file of the newest checkpoint (an interrupted copy/sync)."""
    newest = ck.complete_checkpoints(out, backend)[-1][1]
    files = [
        p for p in Path(newest).rglob("*") if p.is_file() and p.suffix not in (".json", ".txt")
    ]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    return newest


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_kill_9_anywhere_then_resume_is_bit_identical(
    backend, tiny_folders, sample_dataset, tmp_path, capsys
):
    prior, decoder = tiny_folders
    ref, out = tmp_path / "ref", tmp_path / "run"
    flags = dict(backend=backend, **FLAGS)
    _train(backend, train_args(prior, decoder, sample_dataset, ref, **flags), capsys)
    args = train_args(prior, decoder, sample_dataset, out, **flags)
    resume = train_args(
        prior, decoder, sample_dataset, out, resume_from_checkpoint="latest", **flags
    )

    # 1. During a step: as soon as the first update is reported.
    _kill_when(args, out, lambda new, err: "step_loss" in err())

    # 2. During a checkpoint write: its temporary folder just appeared.
    def writing(new, err):
        return any(TMP[backend].match(n) for n in new)

    names = _kill_when(resume, out, writing)
    in_flight = max(int(TMP[backend].match(n).group(1)) for n in names if TMP[backend].match(n))
    latest = ck.resolve_resume(out, "latest", backend)
    assert latest is None or int(latest.name.split("-")[1]) < in_flight

    # 3. During the final export: its first folder or file just appeared.
    names = _kill_when(resume, out, lambda new, err: bool(new & EXPORTED))
    assert "train_summary.json" not in names, "the export finished before the kill"
    assert ck.resolve_resume(out, "latest", backend).name == "checkpoint-6"

    # The final checkpoint is complete: the resumed run trains nothing and redoes the export.
    _train(backend, resume, capsys)
    _assert_same_weights(ref, out)
    assert not [p for p in out.iterdir() if "tmp" in p.name], "a killed write was left behind"

    # 4. A damaged newest checkpoint: 'latest' falls back to checkpoint-4 with a warning.
    damaged = _damage_newest(out, backend)
    stdout, stderr = _train(backend, resume, capsys)
    warning = [x for x in stderr.splitlines() if "checkpoint-6 is damaged" in x]
    assert warning and "checkpoint-4" in warning[0], stderr[-2000:]
    assert "resumed from" in stdout and "checkpoint-4 at update 4" in stdout
    assert "nothing to train" not in stdout  # said of checkpoint-6, which was passed over
    assert "Traceback" not in stderr
    _assert_same_weights(ref, out)

    # 5. Asked for by name, a damaged checkpoint is an error naming the damage; nothing changes.
    _damage_newest(out, backend)
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    named = train_args(
        prior, decoder, sample_dataset, out, resume_from_checkpoint=damaged.name, **flags
    )
    if backend == "flax":
        named += ["--mesh_shape", "data=1"]  # in-process: one of the 8 fake devices, as the run
    capsys.readouterr()
    assert main("prior", named) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "checkpoint-6" in errors[0] and "damaged" in errors[0], errors
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_nonfinite_loss_stops_then_skip_flag_counts_and_changes_nothing(
    backend, tiny_folders, sample_dataset, tmp_path, capsys
):
    """A learning rate of 1e30 makes update 1's weights overflow the next forward pass."""
    prior, decoder = tiny_folders
    out = tmp_path / "out"
    flags = dict(
        backend=backend,
        learning_rate=1e30,
        max_train_steps=3,
        checkpointing_steps=1,
        train_batch_size=1,
        use_ema=True,
        report_to="none",
    )
    if backend == "flax":
        flags["mesh_shape"] = "data=1"
    args = train_args(prior, decoder, sample_dataset, out, **flags)
    assert main("prior", args) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "update 2" in errors[0], errors
    assert "--skip_nonfinite_updates" in errors[0]
    # The checkpoint before the failure is kept; nothing after it, no export.
    assert [p.name for _, p in ck.complete_checkpoints(out, backend)] == ["checkpoint-1"]
    assert not (out / "model_index.json").exists()

    skip = train_args(
        prior,
        decoder,
        sample_dataset,
        out,
        resume_from_checkpoint="latest",
        skip_nonfinite_updates=True,
        **flags,
    )
    assert main("prior", skip) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_updates"] == 2 and summary["updates"] == 3
    assert ck.read_state(out / "checkpoint-3")["skipped_updates"] == 2
    one, three = (
        _train_state(out / "checkpoint-1", backend),
        _train_state(out / "checkpoint-3", backend),
    )
    assert one.keys() == three.keys()
    moved = [k for k in one if not np.array_equal(one[k], three[k])]
    assert not moved, f"a skipped update changed {moved[:5]}"


def _train_state(path: Path, backend: str) -> dict[str, np.ndarray]:
    """Every array a checkpoint holds (weights, optimizer moments and step counts, LR position,
    EMA), flattened to name -> numpy."""
    out = {}

    def flat(prefix, tree):
        if isinstance(tree, dict):
            for k, v in tree.items():
                flat(f"{prefix}.{k}", v)
        elif isinstance(tree, list | tuple):
            for i, v in enumerate(tree):
                flat(f"{prefix}.{i}", v)
        elif tree is not None and not isinstance(tree, str):
            out[prefix] = np.asarray(tree.cpu() if hasattr(tree, "cpu") else tree)

    if backend == "flax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as reader:
            flat("state", reader.restore(path / "state"))
    else:
        import torch

        flat("model", load_file(path / "model.safetensors"))
        for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
            flat(name, torch.load(path / name, weights_only=False))
    return out
