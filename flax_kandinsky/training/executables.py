"""The compiled step kept on disk between runs, so that a warm start neither traces nor lowers it.

jax's persistent compilation cache skips XLA's compile, but it finds its entry by the lowered
program: every start still traces and lowers the step (4.4 s of the tiny decoder's start-up on 2
CPU cores, far more for the real UNet on a TPU host, at every resume after a preemption). Here
the compiled executable itself is stored (`jax.experimental.serialize_executable`) under a key of
everything the trace reads: this package's source, the library versions, XLA's flags and jax's
settings, the devices and mesh, the abstract arguments with their shardings (so the keys of the
hyperparameter dict too), the networks' graph definitions, the stage's configs and noise schedule
and the step's options. Runs that differ only in runtime inputs (learning rate, schedule, run
length, Adam and clipping constants, Min-SNR gamma's value) load it; any other change misses and
compiles as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import sys
import uuid
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
from jax.experimental import serialize_executable

from kandinsky_common.storage import location

log = logging.getLogger(__name__)

_PACKAGES = ("flax_kandinsky", "kandinsky_common")
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl")
_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@cache
def source_digest() -> str:
    """sha256 of every Python file of this project's packages (names and contents)."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _stable_repr(x) -> str:
    """repr without memory addresses (functions and plain objects print them)."""
    return _ADDRESS.sub("", repr(x))


def _signature(tree) -> dict:
    """Tree structure and, per leaf, shape, dtype, weak type and sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    return {
        "tree": _stable_repr(treedef),
        "leaves": [
            (
                tuple(np.shape(x)),
                str(getattr(x, "dtype", np.asarray(x).dtype)),
                bool(getattr(x, "weak_type", False)),
                _stable_repr(getattr(x, "sharding", None)),
            )
            for x in leaves
        ],
    }


def step_key(*, stage, graphdefs, mesh, args: tuple, options: dict) -> str:
    """The hex key of the step compiled for these networks, mesh and abstract arguments."""
    parts = {
        "source": source_digest(),
        "python": sys.version,
        "libraries": {name: metadata.version(name) for name in _LIBRARIES},
        "jax_settings": {name: str(getattr(jax.config, name)) for name in _JAX_SETTINGS},
        "environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
        "devices": [(d.id, d.process_index, d.platform, d.device_kind) for d in mesh.devices.flat],
        "mesh": _stable_repr(mesh.shape),
        "processes": jax.process_count(),
        "args": _signature(args),
        "graphdefs": _stable_repr(graphdefs),
        "stage": [
            type(stage).__name__,
            json.dumps(stage.configs, sort_keys=True, default=_stable_repr),
            _stable_repr(stage.schedule.prediction_type),
            hashlib.sha256(np.asarray(stage.schedule.alphas_cumprod).tobytes()).hexdigest(),
        ],
        "options": _stable_repr(sorted(options.items())),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _fresh(compile_fn: Callable[[], jax.stages.Compiled]) -> jax.stages.Compiled:
    """compile_fn() with jax's persistent cache off: on XLA:CPU an executable that jax's cache
    handed back serializes without its kernels (the loaded copy then fails with "Function ...
    not found"), so the one stored here is always compiled afresh."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return compile_fn()
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def load_or_compile(compile_fn: Callable[[], jax.stages.Compiled], folder, key: str, devices):
    """The executable stored under `key` in `folder`, else `compile_fn()`, stored there for the
    next run; `devices` are the ones it runs on, in the order of its device assignment (a mesh's
    `devices.flat`). `folder` None compiles only. A stored file that does not load (damaged, or
    written by another build that the key did not tell apart) is compiled again and replaced."""
    if folder is None:
        return compile_fn()
    path = location(folder) / f"{key}.step"
    if path.exists():
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=list(devices)
            )
            log.info("compiled step loaded from %s", path)
            return compiled
        except Exception as e:  # noqa: BLE001 - any unreadable entry is only a cache miss
            print(
                f"warning: the stored compiled step {path} did not load "
                f"({type(e).__name__}: {e}); compiling it again",
                file=sys.stderr,
            )
    compiled = _fresh(compile_fn)
    try:
        blob = pickle.dumps(serialize_executable.serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a run killed mid-write, or a second process storing the
        # same key, never leaves a partial file under the key.
        tmp = path.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(blob)
        tmp.replace(path)
    except Exception as e:  # noqa: BLE001 - the run goes on without the stored copy
        print(f"warning: the compiled step was not stored in {folder} ({e})", file=sys.stderr)
    return compiled
