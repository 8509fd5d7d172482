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


def test_versus_reference_runs_three_runners_and_writes_the_table(tmp_path):
    """The reference comparison end to end, with our own scripts standing in for diffusers'
    (they take the same flags; CI has no diffusers checkout): three runners, a row, the JSON."""
    results = tmp_path / "results"
    proc = run_script(
        "bench.py", "--out", tmp_path / "bench", "--reference_scripts", ROOT / "scripts",
        "--stages", "prior", "--sizes", "tiny", "--short", "1", "--long", "2", "--repeats", "1",
        "--no_recompile", "--device", "cpu", "--results", results, timeout=900,
    )  # fmt: skip
    assert "device: jax: cpu" in proc.stdout
    (row,) = [x for x in proc.stdout.splitlines() if x.startswith("| prior | tiny |")]
    assert "—" not in row.split("|")[3:6], row  # every runner measured
    (path,) = results.glob("*-versus-reference-cpu*.json")
    saved = json.loads(path.read_text())
    assert saved["rows"][0]["stage"] == "prior" and saved["table"] in proc.stdout
    for runner in ("reference", "torch", "flax"):
        measured = saved["rows"][0][runner]
        assert measured["long_seconds"] > 0
        assert 0 < measured["first_update_seconds"] < measured["short_seconds"]
    # flax also ran once on an empty compilation cache, and the table shows it
    cold = saved["rows"][0]["flax"]["first_update_cold_seconds"]
    assert cold > 0 and f"| {cold:.1f} |" in row


def test_versus_reference_refuses_a_folder_without_the_scripts(tmp_path):
    proc = run_script(
        "bench.py", "--out", tmp_path, "--reference_scripts", tmp_path, check=False, timeout=60
    )
    assert proc.returncode == 2 and "train_text_to_image_prior.py does not exist" in proc.stderr


def test_versus_times_the_first_update_when_the_bar_shows_it(tmp_path):
    from bench.versus import timed

    # A bar like tqdm's: its first tick written mid-run, the process going on 2 s after it.
    script = (
        "import sys, time\n"
        "sys.stderr.write('Steps:   0%|          | 0/3 [00:00<?, ?it/s]'); sys.stderr.flush()\n"
        "time.sleep(0.5)\n"
        "sys.stderr.write('\\rSteps:  33%|###       | 1/3 [00:00<00:01, 2.0it/s]')\n"
        "sys.stderr.flush(); time.sleep(2.0)\n"
    )
    seconds, first = timed([sys.executable, "-c", script], script_env(), tmp_path / "a.log", 60)
    assert first is not None and 0.5 <= first <= seconds - 1.5
    assert "1/3" in (tmp_path / "a.log").read_text()
    silent = [sys.executable, "-c", "print('no bar')"]
    assert timed(silent, script_env(), tmp_path / "b.log", 60)[1] is None
