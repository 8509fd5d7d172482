"""Checkpoint folder naming, discovery and pruning, shared by both backends.

A checkpoint is `output_dir/checkpoint-N` (N = optimizer updates). It is written under a temporary
name and renamed into place once complete, and `training_state.json` inside it is written last: a
folder without it (a crash mid-write) is never taken as "latest".
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kandinsky_common.errors import UserError

STATE_FILE = "training_state.json"
_NAME = re.compile(r"checkpoint-(\d+)\Z")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def temp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_state(path: str | Path) -> dict:
    f = Path(path) / STATE_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({e}); pick another") from e


def write_state(path: str | Path, state: dict) -> None:
    Path(path, STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None for a fresh run.

    'latest' with no checkpoint starts fresh (so a restart script can always pass it); an explicit
    path that does not exist is an error (the reference silently started over).
    """
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    candidates = [Path(resume), Path(output_dir) / Path(resume).name]
    for c in candidates:
        if c.is_dir():
            if not (c / STATE_FILE).is_file():
                raise UserError(f"checkpoint {c} is incomplete (no {STATE_FILE}); pick another")
            return c
    raise UserError(
        f"--resume_from_checkpoint {resume}: no such checkpoint; pass 'latest' or one of "
        f"{[p.name for _, p in complete_checkpoints(output_dir)] or 'none (none saved yet)'}"
    )


def check_compatible(state: dict, *, stage: str, backend: str, path: Path) -> None:
    if state.get("stage") != stage:
        raise UserError(
            f"checkpoint {path} is from the {state.get('stage')} stage; this is the {stage} "
            "stage: use another --output_dir or the matching script"
        )
    if state.get("backend") != backend:
        raise UserError(
            f"checkpoint {path} was written by the {state.get('backend')} backend; resume it "
            f"with --backend {state.get('backend')}"
        )


def prune(output_dir: str | Path, limit: int | None, keep_room_for_one: bool = True) -> None:
    """Delete the oldest checkpoints so that, after one more is saved, at most `limit` remain."""
    if limit is None:
        return
    found = complete_checkpoints(output_dir)
    excess = len(found) - (limit - 1 if keep_room_for_one else limit)
    for _, p in found[: max(excess, 0)]:
        shutil.rmtree(p)


def finalize(tmp: Path, final: Path) -> None:
    """Atomically move a fully written checkpoint into place."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
