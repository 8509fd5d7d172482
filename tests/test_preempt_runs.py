"""SIGTERM during training (TPU preemption, eviction): both backends save a checkpoint at the
next update boundary, exit 0, and a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    script = str(ROOT / "scripts" / "train_text_to_image_prior.py")
    args = train_args(prior, decoder, sample_dataset, run, **flags)
    proc = subprocess.Popen(
        [sys.executable, script, *args],
        env=script_env(),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # SIGTERM once the progress bar shows a finished update (tqdm writes to stderr).
    seen = ""
    while "step_loss" not in seen and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
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
