"""What a flax run does first: JAX configured, and the step's executable loaded while the rest
of the backend imports and builds.

A warm start still spends seconds loading the step's executable from jax's cache (XLA:CPU
rebuilds its thunks: 2.7-3.0 s of the small decoder's start on 2 CPU cores), and it could begin
only once the networks were built, since the stored program's key reads them. So each run
records, under a digest of its flags, the recipe of the program it compiled (`stored_step.recipe`:
key, mesh, abstract arguments). The next run with the same flags reads that record first thing
and compiles the recipe's program on a thread, while the main thread imports flax, orbax and
datasets, builds the networks and plans the data. set_up takes the executable only if the
recipe it computes itself is the very same (the key covers source, libraries, networks, mesh
and shapes). Otherwise the early work is dropped and the step compiles as before: a stale
record costs time, never correctness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import jax
from jax import export

from flax_kandinsky.hosts import init_distributed
from flax_kandinsky.training.stored_step import SUFFIX, from_recipe, jit_program, steps_folder
from flax_kandinsky.xla_flags import use_cpu_low_memory_schedule
from kandinsky_common.flags import TrainConfig
from kandinsky_common.storage import location

# Flags that never reach the compiled step: bookkeeping, and the hyperparameters the step reads
# as inputs. Runs that differ only in them share a record. A flag wrongly left out of this set
# only makes such runs miss the early load; one wrongly in it makes them load a program that
# set_up then refuses.
_NOT_IN_STEP = frozenset(
    {
        "output_dir",
        "logging_dir",
        "report_to",
        "tracker_project_name",
        "seed",
        "num_train_epochs",
        "max_train_steps",
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_step_rules",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "adam_weight_decay",
        "max_grad_norm",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "validation_epochs",
        "validation_steps",
        "push_to_hub",
        "hub_token",
        "hub_model_id",
        "local_rank",
        "dataloader_num_workers",
    }
)


def configure_jax(cfg: TrainConfig) -> None:
    """The process-wide JAX settings the flags ask for: the distributed runtime, TF32 matmuls and
    the persistent compilation cache. Once per process, before anything touches a device."""
    if cfg.validation_prompts or cfg.with_prior_preservation:
        use_cpu_low_memory_schedule()  # the run samples images (validation, class images)
    init_distributed(cfg)
    if cfg.allow_tf32:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    if cfg.compile_cache_dir:
        # A warm cache turns minutes of XLA compilation of a real-size step into seconds. Every
        # program is kept, the small ones too (weight casts, state init): compiled afresh they
        # cost a second or more of each start, and a hyperparameter change then compiles nothing.
        jax.config.update(
            "jax_compilation_cache_dir", str(Path(cfg.compile_cache_dir).expanduser())
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def record_path(cfg: TrainConfig, stage_name: str):
    """Where runs with these flags keep the recipe of their step (None without a cache)."""
    if not cfg.compile_cache_dir:
        return None
    flags = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_STEP}
    parts = [stage_name, flags, os.environ.get("XLA_FLAGS"), jax.process_count()]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return location(steps_folder(cfg.compile_cache_dir)) / "starts" / f"{digest}.json"


class StepPreload:
    """The step's executable, compiled on a thread from the recipe an earlier run with the same
    flags recorded.

    Parameters:
        record: the record of these flags (`record_path`); None when the cache is off.
        recipe: the recipe read from it and being compiled, or None.
        taken: whether set_up took the executable compiled here.
    """

    def __init__(self, record=None, recipe: dict | None = None):
        self.record, self.recipe = record, recipe
        self.taken = False
        self._compiled = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, cfg: TrainConfig, stage_name: str) -> StepPreload:
        record = record_path(cfg, stage_name)
        recipe = None
        if record is not None:
            try:
                recipe = json.loads(record.read_text())
            except (OSError, ValueError):  # no record yet, or an unreadable one: rewritten later
                recipe = None
        preload = cls(record, recipe)
        if recipe is not None:
            jax.devices()  # the backend starts on the main thread, before the other imports
            program = location(steps_folder(cfg.compile_cache_dir)) / f"{recipe['key']}{SUFFIX}"
            preload._thread = threading.Thread(
                target=preload._compile, args=(program,), name="step-preload"
            )
            preload._thread.start()
        return preload

    def _compile(self, program) -> None:
        try:
            exported = export.deserialize(bytearray(program.read_bytes()))
            shardings, avals, hyper_sharding = from_recipe(self.recipe)
            fn = jit_program(exported, shardings, hyper_sharding, self.recipe["n_state"])
            self._compiled = fn.lower(*avals).compile()
        except Exception:  # noqa: BLE001 - set_up then compiles, and reports, as without a record
            self._compiled = None

    def take(self, wanted: dict | None):
        """The executable compiled early if `wanted` (the recipe set_up computed) is the one it
        was compiled from, waiting for it; else None."""
        if self._thread is None or wanted is None or wanted != self.recipe:
            return None  # a running thread finishes on its own; its executable is dropped
        self._thread.join()
        self.taken = self._compiled is not None
        return self._compiled

    def remember(self, wanted: dict | None) -> None:
        """Record `wanted` for the next run with these flags (process 0, when it changed)."""
        if self.record is None or wanted is None or wanted == self.recipe:
            return
        if jax.process_index() != 0:
            return
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            # written aside and renamed: a run reading it never sees half a record
            tmp = self.record.parent / f".{self.record.name}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(wanted))
            tmp.replace(self.record)
        except OSError:  # a read-only cache: the next run only starts as it did without records
            pass
        self.recipe = wanted


def begin(cfg: TrainConfig, stage_name: str) -> StepPreload:
    """configure_jax, then the step's early load when these flags have a record."""
    configure_jax(cfg)
    return StepPreload.start(cfg, stage_name)
