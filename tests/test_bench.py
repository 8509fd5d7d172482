"""scripts/bench.py starts and documents itself without importing a framework, and one flax run of
its worker measures what the table reports (the whole benchmark takes minutes: run it by hand,
see bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.worker import PREFIX
from tests.helpers import ROOT, run_script, script_env, train_args


def test_bench_help():
    proc = run_script("bench.py", "--help", timeout=60)
    assert "--out" in proc.stdout and "--stages" in proc.stdout


def test_flax_worker_reports_speed_and_the_compiled_steps_flops(
    tiny_folders, sample_dataset, tmp_path
):
    prior, decoder = tiny_folders
    args = train_args(
        prior, decoder, sample_dataset, tmp_path / "out", backend="flax", max_train_steps=5,
        train_batch_size=1, mesh_shape="data=1", report_to="none", compile_cache_dir="",
    )  # fmt: skip
    spec = {
        "kind": "train",
        "backend": "flax",
        "stage": "prior",
        "args": [str(a) for a in args],
        "samples_per_update": 1,
        "flops": True,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker", json.dumps(spec)],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith(PREFIX)]
    result = json.loads(line[len(PREFIX) :])
    assert result["step_flops"] > 0 and result["samples_per_second"] > 0
    assert len(result["update_seconds"]) == 5
