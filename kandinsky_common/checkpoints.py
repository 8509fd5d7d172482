"""Checkpoint folder naming, discovery and pruning, shared by both backends.

A checkpoint is `output_dir/checkpoint-N` (N = optimizer updates). It is written under a temporary
name and renamed into place once complete, and `training_state.json` inside it is written last: a
folder without it (a crash mid-write) is never taken as "latest".

The flax backend's checkpoints (orbax) share the folder name. Orbax writes them under
`checkpoint-N.orbax-checkpoint-tmp` and renames once every item is committed, and the run's JSON
state is the orbax item `meta/training_state.json`. `backend="flax"` selects that completeness rule;
it still counts torch checkpoints as complete so that resuming one with the wrong backend ends in
`check_compatible`'s "use --backend torch" rather than a silent fresh start.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from kandinsky_common.errors import UserError
from kandinsky_common.storage import is_url, location

STATE_FILE = "training_state.json"
_NAME = re.compile(r"checkpoint-(\d+)\Z")

# The flax backend's layout (written by flax_kandinsky.checkpoint through orbax).
FLAX_STATE_ITEM = "state"
FLAX_META_ITEM = "meta"
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"
ORBAX_COMMIT_FILE = "commit_success.txt"


def _torch_incomplete(path: Path) -> str | None:
    return None if (path / STATE_FILE).is_file() else f"no {STATE_FILE}"


def _flax_incomplete(path: Path) -> str | None:
    if ORBAX_TMP_MARK in path.name:
        return "orbax was still writing it when the run stopped"
    if (path / STATE_FILE).is_file():
        return None  # a torch checkpoint: complete, and check_compatible names the backend
    if is_url(path) and not (path / ORBAX_COMMIT_FILE).is_file():
        # Buckets have no atomic rename: orbax writes in place and commits with this file.
        return f"no {ORBAX_COMMIT_FILE}: orbax was still writing it when the run stopped"
    if not ((path / FLAX_STATE_ITEM).is_dir() or (path / FLAX_META_ITEM).is_dir()):
        return f"no {FLAX_STATE_ITEM}/ or {FLAX_META_ITEM}/ inside"
    return None


_INCOMPLETE: dict[str, Callable[[Path], str | None]] = {
    "torch": _torch_incomplete,
    "flax": _flax_incomplete,
}


def incomplete_reason(path: str | Path, backend: str = "torch") -> str | None:
    """Why `path` is not a finished checkpoint for `backend` to consider, or None if it is one."""
    return _INCOMPLETE[backend](location(path))


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return location(output_dir) / f"checkpoint-{step}"


def temp_dir(output_dir: str | Path, step: int) -> Path:
    return location(output_dir) / f".checkpoint-{step}.tmp"


def complete_checkpoints(output_dir: str | Path, backend: str = "torch") -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    out = []
    root = location(output_dir)
    if not root.is_dir():
        return out
    try:
        children = list(root.iterdir())
    except FileNotFoundError:  # in a bucket a folder is gone with its last object
        return out
    for p in children:
        m = _NAME.match(p.name)
        if m and p.is_dir() and incomplete_reason(p, backend) is None:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_state(path: str | Path) -> dict:
    f = location(path) / STATE_FILE
    flax_f = location(path) / FLAX_META_ITEM / STATE_FILE
    if not f.is_file() and flax_f.is_file():
        f = flax_f
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({e}); pick another") from e


def checkpoint_backend(path: str | Path) -> str | None:
    """Which backend wrote checkpoint folder `path` (by layout), or None if neither's."""
    path = location(path)
    if (path / STATE_FILE).is_file():
        return "torch"
    if (path / FLAX_META_ITEM).is_dir() or (path / FLAX_STATE_ITEM).is_dir():
        return "flax"
    return None


def check_no_foreign_checkpoints(output_dir: str | Path, backend: str) -> None:
    """Refuse an output_dir holding the other backend's checkpoints: 'latest' could pick one, and
    a save of the same step would replace it."""
    root = location(output_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        other = checkpoint_backend(p) if _NAME.match(p.name) and p.is_dir() else None
        if other is not None and other != backend:
            raise UserError(
                f"{root} holds checkpoints of the {other} backend ({p.name}); resume them with "
                f"--backend {other}, or use another --output_dir"
            )


def newest_readable(output_dir: str | Path, backend: str = "torch") -> tuple[Path, dict] | None:
    """(path, state) of the newest complete checkpoint whose JSON state reads back, or None.

    A damaged one is passed over silently here: the backend's restore meets it again and names
    the damage in its warning when it falls back past it.
    """
    for _, path in reversed(complete_checkpoints(output_dir, backend)):
        try:
            return path, read_state(path)
        except UserError:
            continue
    return None


def stale_temp_dirs(output_dir: str | Path) -> list[Path]:
    """`.checkpoint-N.tmp` folders: saves that a killed or failed run never finished."""
    root = location(output_dir)
    return sorted(root.glob(".checkpoint-*.tmp")) if root.is_dir() else []


def exception_chain(e: BaseException):
    """`e` and its causes and contexts, outermost first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _disk_full(e: BaseException, folder: Path) -> bool:
    for x in exception_chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(x) or "os_error_code='28'" in str(x):
            return True
    if any(isinstance(x, OSError) and x.errno for x in exception_chain(e)):
        return False  # the OS said what went wrong, and it was not space
    # torch.save reports a full disk as a zip writer failure without an errno: then the space
    # left decides.
    text = " ".join(str(x) for x in exception_chain(e))
    if "PytorchStreamWriter" not in text and "file write failed" not in text:
        return False
    if is_url(folder):
        return False
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _denied(e: BaseException) -> bool:
    for x in exception_chain(e):
        if isinstance(x, PermissionError) or (
            isinstance(x, OSError) and x.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        ):
            return True
        if "Permission denied" in str(x) or "Read-only file system" in str(x):
            return True
    return False


def write_failed(
    path: str | Path, error: BaseException, backend: str = "torch", what: str | None = None
) -> UserError:
    """One line for a checkpoint (or, `what`, the final export) that could not be written: the
    real cause, what is still safe, and the fix for that cause."""
    path = location(path)
    root = path.parent
    if _disk_full(error, root):
        reason, fix = "no space left on the device", "free space"
    elif _denied(error):
        reason = "permission denied"
        fix = f"make {root} writable for this user"
    else:
        text = " ".join(str(error).split()) or type(error).__name__
        reason = text if len(text) <= 200 else text[:197] + "..."
        fix = "fix that"
    found = complete_checkpoints(root, backend)
    kept = (
        f"{found[-1][1].name} is the newest complete checkpoint"
        if found
        else "no checkpoint was completed yet"
    )
    return UserError(
        f"writing {what or path.name} in {root} failed ({reason}); {kept}: {fix}, then rerun "
        "with --resume_from_checkpoint latest"
    )


def write_state(path: str | Path, state: dict) -> None:
    (location(path) / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def resolve_resume(
    output_dir: str | Path, resume: str | None, backend: str = "torch"
) -> Path | None:
    """The checkpoint to resume from: None for a fresh run.

    'latest' with no checkpoint starts fresh (so a restart script can always pass it); an explicit
    path that does not exist is an error (the reference silently started over). `backend` picks
    the rule for "complete" (see the module docstring); the messages are the same for both.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir, backend)
        return found[-1][1] if found else None
    candidates = [location(resume), location(output_dir) / location(resume).name]
    for c in candidates:
        if c.is_dir():
            reason = incomplete_reason(c, backend)
            if reason is not None:
                raise UserError(f"checkpoint {c} is incomplete ({reason}); pick another")
            return c
    names = [p.name for _, p in complete_checkpoints(output_dir, backend)]
    raise UserError(
        f"--resume_from_checkpoint {resume}: no such checkpoint; pass 'latest' or one of "
        f"{names or 'none (none saved yet)'}"
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
        p.rmtree()


def finalize(tmp: Path, final: Path) -> None:
    """Atomically move a fully written checkpoint into place (local folders: the torch backend)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
