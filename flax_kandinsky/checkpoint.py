"""Resumable checkpoints of the flax backend: orbax, laid out like the torch backend's.

One checkpoint is `output_dir/checkpoint-N` (N = optimizer updates) holding two orbax items:

- `state/`: the train state PyTree (params, optimizer state, EMA, step), arrays in OCDBT/zarr,
  each process writing its own shards; restored straight into whatever shardings the caller asks
  for, so a checkpoint written on 8 devices resumes on 1 and the other way round.
- `meta/training_state.json`: the run's JSON state (global_step, stage, backend, seed, data
  position, config), written by orbax on the primary process only. The file name matches the torch
  backend's, so `kandinsky_common.checkpoints.read_state` reads both.

Orbax writes into `checkpoint-N.orbax-checkpoint-tmp` and renames it once every process has
committed every item, so a folder named `checkpoint-N` is complete: "latest" never picks one that
was being written when the process died. Saving is asynchronous by default: `save` returns once the
arrays are copied off the devices (the caller may then donate or overwrite them), and the files are
written in a background thread; `wait()`/`close()` block until they are on disk.

Damage found on restore (a deleted or truncated file) becomes a `CheckpointDamaged` (a UserError
naming the damage), never a raw tensorstore traceback; `restore_latest_good` then falls back to the
previous checkpoint with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from flax_kandinsky.orbax_failures import (
    describe_damage,
    drop_aborted_read_reports,
    is_damage,
    join_writer_threads,
    raise_unreadable,
    root_cause,
)
from kandinsky_common import checkpoints as ck
from kandinsky_common.errors import CheckpointDamaged, UserError
from kandinsky_common.storage import is_url, location

log = logging.getLogger(__name__)

BACKEND = "flax"
STATE_ITEM = ck.FLAX_STATE_ITEM
META_ITEM = ck.FLAX_META_ITEM
_NAME = re.compile(r"checkpoint-(\d+)\Z")


def _is_orbax_checkpoint(path: epath.Path) -> bool:
    """A finalized flax checkpoint: orbax's own test, minus torch checkpoints of the same name."""
    return (
        path.is_dir()
        and ocp.step.is_path_finalized(path)
        and not (path / ck.STATE_FILE).exists()
        and ck.incomplete_reason(path, BACKEND) is None
    )


@dataclasses.dataclass(frozen=True)
class _DashNameFormat:
    """orbax `NameFormat` for `checkpoint-N`: orbax's standard formats only offer `prefix_N`."""

    def __str__(self) -> str:
        return 'NameFormat("checkpoint-<step>")'

    def build_name(self, step: int) -> str:
        return ck.checkpoint_dir("", step).name

    def _metadata(self, path: epath.Path) -> ocp.step.Metadata | None:
        m = _NAME.match(path.name)
        if m is None or not _is_orbax_checkpoint(path):
            return None
        return ocp.step.Metadata(step=int(m.group(1)), path=path)

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
        base = epath.Path(base_path)
        if not base.is_dir():
            return iter([])
        return ocp.step.build_step_metadatas(base.iterdir(), self._metadata)

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
        found = self._metadata(epath.Path(base_path) / self.build_name(step))
        if found is None:
            raise ValueError(f"no finalized {self.build_name(step)} under {base_path}")
        return found


_NAME_FORMAT = _DashNameFormat()


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.StandardCheckpointHandler()
    meta_handler = ocp.JsonCheckpointHandler(filename=ck.STATE_FILE)
    registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
    registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
    registry.add(META_ITEM, ocp.args.JsonSave, meta_handler)
    registry.add(META_ITEM, ocp.args.JsonRestore, meta_handler)
    return registry


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`--resume_from_checkpoint` for the flax backend: None (fresh), 'latest', or a path/name.

    Same rules and messages as the torch backend (kandinsky_common.checkpoints.resolve_resume):
    'latest' without a checkpoint is a fresh start, a missing explicit path is a UserError.
    """
    return ck.resolve_resume(output_dir, resume, backend=BACKEND)


def read_meta(path: str | Path) -> dict:
    """The JSON state of checkpoint `path` (cheap: no arrays are read)."""
    path = location(path)
    if (path / ck.STATE_FILE).is_file():
        return ck.read_state(path)  # a torch checkpoint: check_compatible then names the backend
    f = path / META_ITEM / ck.STATE_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError as e:
        raise CheckpointDamaged(path, f"{META_ITEM}/{ck.STATE_FILE} is missing") from e
    except PermissionError as e:
        raise_unreadable(path, e)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(path, f"{META_ITEM}/{ck.STATE_FILE} is unreadable: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointDamaged(path, f"{META_ITEM}/{ck.STATE_FILE} is not a JSON object")
    return meta


def _absolute(path: str | Path) -> epath.Path:
    return location(path if is_url(path) else os.path.abspath(os.path.expanduser(path)))


def _name(path) -> str:
    """orbax's storage name of the leaf at a key path ('params.unet.conv.kernel')."""

    def part(k):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return ".".join(part(k) for k in path)


def _names_and_leaves(abstract_state: Any) -> dict[str, Any]:
    """orbax's storage name of every leaf ('params.unet.conv.kernel', 'opt.0.mu...')."""
    # Built from the leaf paths, not ocp.tree.get_param_names: that one also names empty nodes
    # (optax's EmptyState), which would shift a zip against the leaves.
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
    return {_name(path): leaf for path, leaf in flat}


def _as_written_before_pure_dicts(abstract_state: Any, legacy: set[str]) -> Any:
    """The restore target of a checkpoint written while the train state held nnx Variables (the
    older layout): each of those arrays is stored under a trailing `.value`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: {"value": leaf} if _name(path) in legacy else leaf, abstract_state
    )


def _listing(names, limit: int = 3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class CheckpointStore:
    """The flax backend's checkpoints under `output_dir` (see the module docstring).

    Creating a store touches nothing on disk: the orbax manager (which creates `output_dir` and
    removes tmp folders left by a killed run) starts with the first `save`, so a resume that fails
    on a user mistake has written and deleted nothing. Every process calls every method; orbax
    coordinates which process writes what.
    """

    def __init__(self, output_dir: str | Path, max_to_keep: int | None, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise UserError(f"--checkpoints_total_limit {max_to_keep}: keep at least 1 checkpoint")
        # orbax (tensorstore) takes absolute paths only: resolved here too, so that no caller's
        # relative path turns a good checkpoint into a "damaged" one.
        self.output_dir = _absolute(output_dir)
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._manager: ocp.CheckpointManager | None = None
        self._reader: ocp.Checkpointer | None = None
        self._last_saved: int | None = None
        self._closed = False

    # --- saving -----------------------------------------------------------------------------

    def _get_manager(self) -> ocp.CheckpointManager:
        if self._closed:
            raise RuntimeError("CheckpointStore is closed")
        if self._manager is None:
            bucket = is_url(self.output_dir)
            if bucket:
                self._remove_uncommitted()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep,
                step_name_format=_NAME_FORMAT,
                enable_async_checkpointing=self.async_save,
                # In a bucket orbax takes every folder without commit_success.txt for a tmp
                # checkpoint, the run's logs/, validation/ and pipeline folder included.
                cleanup_tmp_directories=not bucket,
                create=True,
            )
            self._manager = ocp.CheckpointManager(
                epath.Path(self.output_dir), options=options, handler_registry=_handler_registry()
            )
        return self._manager

    def _remove_uncommitted(self) -> None:
        """checkpoint-N folders in a bucket that a killed run left without orbax's commit file."""
        if jax.process_index() != 0 or not self.output_dir.is_dir():
            return
        for p in self.output_dir.iterdir():
            if _NAME.match(p.name) and ck.incomplete_reason(p, BACKEND) is not None:
                log.warning("removing %s: a save that never completed", p)
                p.rmtree(missing_ok=True)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Checkpoint `state` (a PyTree of jax.Array, any sharding) and `meta` as step `step`.

        `meta` must be JSON (global_step, stage, seed, data position, config); `backend` and
        `global_step` default to "flax" and `step`. With async saving this returns once the arrays
        are off the devices, before the files are written; the oldest checkpoints beyond
        `max_to_keep` are deleted once the new one is complete. Saving a step that this store just
        saved is a no-op (the final save and a preemption save can coincide); a checkpoint of the
        same step left by an earlier run (one past the step resumed from) is replaced.
        """
        # Round-trip now so that a non-JSON value fails here, not in the background writer.
        meta = json.loads(json.dumps(meta))
        meta.setdefault("backend", BACKEND)
        meta.setdefault("global_step", step)
        if meta["backend"] != BACKEND:
            raise ValueError(f"meta says backend {meta['backend']!r}; this store writes flax")
        if step == self._last_saved:
            return
        drop_aborted_read_reports()  # a failed write (full disk) spews like a failed read
        manager = self._get_manager()
        self.wait()  # the previous save's failure is that checkpoint's, not this one's
        if step in manager.all_steps():
            manager.wait_until_finished()
            log.warning("replacing %s left by an earlier run", self.path(step))
            manager.delete(step)
        elif self.path(step).exists():
            raise UserError(
                f"{self.path(step)} exists and is not a flax checkpoint (a torch run's?); move it "
                "away or use another --output_dir"
            )
        args = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
        try:
            manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            self._write_failed(step, e)
        self._last_saved = step

    def _write_failed(self, step: int, error: Exception) -> None:
        """A save that failed (a full disk): its folder never became `checkpoint-N`, so "latest"
        is the previous one. Remove the remains to give the space back, and say so in one line."""
        failure = ck.write_failed(self.path(step), error, BACKEND)
        join_writer_threads()
        if jax.process_index() == 0:
            for tmp in self.output_dir.glob(f"{self.path(step).name}{ck.ORBAX_TMP_MARK}*"):
                tmp.rmtree(missing_ok=True)
        raise failure from error

    def wait(self) -> None:
        """Block until every started save is on disk and finalized (a failure: UserError)."""
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            except Exception as e:
                self._write_failed(self._last_saved, e)

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads; the store is unusable afterwards."""
        if self._manager is not None:
            manager, self._manager = self._manager, None
            self._closed = True
            try:
                manager.close()
            except Exception as e:
                self._write_failed(self._last_saved, e)
        self._closed = True

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- discovery --------------------------------------------------------------------------

    def path(self, step: int) -> Path:
        return ck.checkpoint_dir(self.output_dir, step)

    def steps(self) -> list[int]:
        """Steps of the complete flax checkpoints on disk, oldest first (not in-flight ones)."""
        return sorted(m.step for m in _NAME_FORMAT.find_all(self.output_dir))

    def latest_step(self) -> int | None:
        found = self.steps()
        return found[-1] if found else None

    # --- restoring --------------------------------------------------------------------------

    def _get_reader(self) -> ocp.Checkpointer:
        if self._reader is None:
            handler = ocp.CompositeCheckpointHandler(handler_registry=_handler_registry())
            self._reader = ocp.Checkpointer(handler)
        return self._reader

    def _locate(self, step_or_path: int | str | Path) -> Path:
        if isinstance(step_or_path, int):
            path = self.path(step_or_path)
            if not path.is_dir():
                names = [self.path(s).name for s in self.steps()]
                raise UserError(
                    f"no {path.name} in {self.output_dir}; complete checkpoints: "
                    f"{names or 'none (none saved yet)'}"
                )
        else:
            path = _absolute(step_or_path)
            if not path.is_dir():
                raise UserError(f"checkpoint {path} does not exist")
        reason = ck.incomplete_reason(path, BACKEND)
        if reason is not None:
            raise UserError(f"checkpoint {path} is incomplete ({reason}); pick another")
        return path

    def _check_fits(self, path: Path, abstract_state: Any) -> set[str]:
        """Compare names and shapes before reading: a mismatch is the user's flags, not damage.
        Returns the leaves the checkpoint stores in the layout before pure dicts (`.value`)."""
        wanted = _names_and_leaves(abstract_state)
        for name, leaf in wanted.items():
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(f"abstract_state leaf {name} has no sharding to restore into")
        if not (path / STATE_ITEM).is_dir():
            raise CheckpointDamaged(path, f"{STATE_ITEM}/ is missing")
        try:
            metadata = self._get_reader().metadata(epath.Path(path)).item_metadata
            tree = metadata.get(STATE_ITEM) if metadata is not None else None
        except Exception as e:
            raise_unreadable(path, e)
            if not is_damage(e):
                raise
            raise CheckpointDamaged(path, f"{STATE_ITEM}/ metadata: {root_cause(e)}") from e
        if tree is None:
            return set()  # only the tree metadata file is gone; the restore finds out about that
        saved = {leaf.name: leaf for leaf in jax.tree.leaves(tree.tree) if hasattr(leaf, "name")}
        legacy = {n for n in wanted.keys() - saved.keys() if f"{n}.value" in saved}
        renamed = {n: n.removesuffix(".value") for n in saved}
        saved = {renamed[n] if renamed[n] in legacy else n: leaf for n, leaf in saved.items()}
        problems = []
        if missing := wanted.keys() - saved.keys():
            problems.append(f"not in the checkpoint: {_listing(missing)}")
        if extra := saved.keys() - wanted.keys():
            problems.append(f"not in this run: {_listing(extra)}")
        for name in sorted(wanted.keys() & saved.keys()):
            was, now = tuple(getattr(saved[name], "shape", ())), tuple(wanted[name].shape)
            if was != now:
                problems.append(f"{name} has shape {was} there, {now} here")
                break
        if problems:
            raise UserError(
                f"checkpoint {path} does not fit this run's training state ({'; '.join(problems)})"
                ": resume with the model and flags it was written with, or use another "
                "--output_dir"
            )
        return legacy

    def restore(
        self, step_or_path: int | str | Path, abstract_state: Any, *, stage: str | None = None
    ) -> tuple[Any, dict]:
        """(state, meta) of a checkpoint, arrays placed as `abstract_state` says.

        `abstract_state` is a PyTree of jax.ShapeDtypeStruct with `.sharding` (e.g. from
        `jax.eval_shape` plus the run's shardings); each array is read directly into its target
        sharding, whatever mesh wrote it. Dtypes follow `abstract_state`. With `stage`, a checkpoint
        of the other stage or the torch backend is refused before any array is read.
        """
        path = self._locate(step_or_path)
        meta = read_meta(path)
        ck.check_compatible(
            meta, stage=meta.get("stage") if stage is None else stage, backend=BACKEND, path=path
        )
        legacy = self._check_fits(path, abstract_state)
        target = _as_written_before_pure_dicts(abstract_state, legacy) if legacy else abstract_state
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
        drop_aborted_read_reports()  # before: the reports can come from other threads at once
        try:
            restored = self._get_reader().restore(epath.Path(path), args=args)
        except Exception as e:
            raise_unreadable(path, e)
            if not is_damage(e):
                raise  # out of memory, a bug, ...: not the checkpoint's fault, never "damaged"
            raise CheckpointDamaged(path, describe_damage(e)) from e
        state = restored[STATE_ITEM]
        if legacy:  # same leaves in the same order, one dict level deeper
            state = jax.tree.unflatten(jax.tree.structure(abstract_state), jax.tree.leaves(state))
        return state, meta

    def restore_latest_good(
        self, abstract_state: Any, *, stage: str | None = None
    ) -> tuple[Any, dict] | None:
        """Restore the newest checkpoint that reads back; None when there is none at all.

        A damaged checkpoint is skipped with a warning naming the damage (a run killed while the
        filesystem was flushing, a disk that filled up). Anything else wrong (other stage, other
        backend, other model shapes) is raised: an older checkpoint would not fix it. If every
        checkpoint is damaged, that is an error rather than a silent fresh start.
        """
        found = ck.complete_checkpoints(self.output_dir, BACKEND)
        damaged = []
        for i in range(len(found) - 1, -1, -1):
            try:
                return self.restore(found[i][1], abstract_state, stage=stage)
            except CheckpointDamaged as e:
                damaged.append(e)
                fallback = found[i - 1][1].name if i > 0 else "nothing older"
                log.warning("%s is damaged (%s); trying %s", e.path.name, e.damage, fallback)
        if damaged:
            raise UserError(
                f"every checkpoint in {self.output_dir} is damaged ("
                + "; ".join(f"{e.path.name}: {e.damage}" for e in damaged)
                + "); delete them to start over, or use another --output_dir"
            )
        return None

    def resume(
        self, resume: str | None, abstract_state: Any, *, stage: str
    ) -> tuple[Any, dict] | None:
        """What the training loop calls with `--resume_from_checkpoint`: (state, meta) or None.

        'latest' falls back past damaged checkpoints; an explicit checkpoint that is damaged is an
        error (the user asked for that one).
        """
        path = resolve_resume(self.output_dir, resume)
        if path is None:
            return None
        if resume == "latest":
            return self.restore_latest_good(abstract_state, stage=stage)
        return self.restore(path, abstract_state, stage=stage)
