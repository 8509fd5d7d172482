#!/usr/bin/env bash
# Make (or refresh) the project venv at .venv: torch 2.13.0 CPU wheel first (a looser pin pulls a
# multi-GB CUDA build), then this package with every extra. Re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KANDINSKY_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[torch,jax,test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# A venv made for another checkout (copied, or that checkout moved or deleted) has every
# dependency but maps this package to a folder that is gone: install this checkout, no deps.
if ! "$VENV/bin/python" -P -c "import kandinsky_common" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
# An editable install compiles none of this project's modules to bytecode, and where
# PYTHONDONTWRITEBYTECODE is set (containers, CI) Python never writes it: every run compiled them
# again, 0.2 s of each start. Stale files are only ignored (Python checks each source's mtime).
"$VENV/bin/python" -m compileall -q flax_kandinsky kandinsky_common torch_kandinsky >/dev/null
