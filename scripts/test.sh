#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (lint, unit, end-to-end, parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One pytest worker per core, at most 4 and one per 6 GiB of memory (each builds the session's
# fixtures and holds its own jax; the 512 px generation test peaks at 5.4 GB), none on one core.
# A test module stays on one worker, so its shared runs are made once. TEST_WORKERS=N overrides
# (0: everything in this process).
cores=$(nproc)
mem_gib=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1048576))
workers=$((cores < 4 ? cores : 4))
workers=$((workers < mem_gib / 6 ? workers : mem_gib / 6))
workers=${TEST_WORKERS:-$((workers < 2 ? 0 : workers))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadscope "$@"
