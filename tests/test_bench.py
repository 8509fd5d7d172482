"""scripts/bench.py starts and documents itself without importing a framework (the benchmark
itself takes minutes: run it by hand, see bench/__init__.py)."""

from __future__ import annotations

from tests.helpers import run_script


def test_bench_help():
    proc = run_script("bench.py", "--help", timeout=60)
    assert "--out" in proc.stdout and "--stages" in proc.stdout
