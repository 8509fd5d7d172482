#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (lint, unit, end-to-end, parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One pytest worker per core, at most 4 (each builds the session's fixtures and holds its own
# jax), none on one core; a test module stays on one worker so its shared runs are made once.
# TEST_WORKERS=N overrides (0: everything in this process).
cores=$(nproc)
workers=${TEST_WORKERS:-$((cores < 2 ? 0 : cores < 4 ? cores : 4))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadscope "$@"
