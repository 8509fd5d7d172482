#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (lint, unit, end-to-end, parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
