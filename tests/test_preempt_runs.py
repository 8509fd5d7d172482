"""SIGTERM during training (TPU preemption, eviction): both backends save a checkpoint at the
next update boundary, exit 0, and a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import ROOT, run_script, script_env, train_args


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_sigterm_saves_exits_0_and_resumes_exactly(backend, tiny_folders, sample_dataset, tmp_path):
    prior, decoder = tiny_folders
    flags = dict(
        backend=backend,
        max_train_steps=120,
        checkpointing_steps=1000,
        report_to="none",
        train_batch_size=1,
    )
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_script(
        "train_text_to_image_prior.py", *train_args(prior, decoder, sample_dataset, ref, **flags)
    )
    proc = _start(train_args(prior, decoder, sample_dataset, run, **flags), ROOT)
    # SIGTERM once the progress bar shows a finished update (tqdm writes to stderr).
    seen = _read_until(proc, "step_loss")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    err = seen + err
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out + err
    saved = sorted(run.glob("checkpoint-*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 120
    resumed = train_args(
        prior, decoder, sample_dataset, run, resume_from_checkpoint="latest", **flags
    )
    run_script("train_text_to_image_prior.py", *resumed)
    a = load_file(ref / "prior" / "diffusion_pytorch_model.safetensors")
    b = load_file(run / "prior" / "diffusion_pytorch_model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _start(args, cwd):
    script = str(ROOT / "scripts" / "train_text_to_image_prior.py")
    return subprocess.Popen(
        [sys.executable, script, *args],
        env=script_env(),
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_library(proc, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    maps = f"/proc/{proc.pid}/maps"
    while proc.poll() is None and time.monotonic() < deadline:
        with open(maps) as f:
            if name in f.read():
                return
        time.sleep(0.01)
    raise AssertionError(f"{name} was never loaded; exit status {proc.poll()}")


def _read_until(proc, marker: str) -> str:
    seen = ""
    while marker not in seen and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
    return seen


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_ctrl_c_saves_a_checkpoint_like_sigterm(backend, tiny_folders, sample_dataset, tmp_path):
    """The first Ctrl-C: a checkpoint at the next update boundary, one line, status 130 (the
    shell's "interrupted"), no traceback; the run then resumes from it."""
    prior, decoder = tiny_folders
    flags = dict(backend=backend, max_train_steps=200, checkpointing_steps=1000, report_to="none")
    proc = _start(train_args(prior, decoder, sample_dataset, "run", **flags), tmp_path)
    seen = _read_until(proc, "step_loss")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    err = seen + err
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped by SIGINT" in out and "--resume_from_checkpoint latest" in out
    (saved,) = (tmp_path / "run").glob("checkpoint-*")
    step = int(saved.name.split("-")[1])
    assert 0 < step < 200
    resumed = train_args(
        prior, decoder, sample_dataset, "run", resume_from_checkpoint="latest", **flags
    )
    resumed += ["--max_train_steps", str(step + 2)]  # the last one given wins
    proc = run_script("train_text_to_image_prior.py", *resumed, cwd=tmp_path)
    assert f"resumed from {saved}" in proc.stdout


def test_ctrl_c_before_training_is_one_line(tiny_folders, sample_dataset, tmp_path):
    """Ctrl-C while the backend is imported (no guard yet): one line, status 130, not the
    SIGSEGV that a KeyboardInterrupt inside jaxlib's initialisation ends in."""
    prior, decoder = tiny_folders
    proc = _start(train_args(prior, decoder, sample_dataset, "run", report_to="none"), tmp_path)
    # The flags are parsed before the backend is imported: interrupt once jaxlib is mapped into
    # the process, while its import still runs.
    _wait_for_library(proc, "jaxlib")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C): stopped at once")
