"""The step's lowered program kept on disk between runs, so that a warm start does not trace it.

jax's persistent compilation cache skips XLA's compile, but it finds its entry by the lowered
program, so every start still traced and lowered the step: 2.3 s of the small decoder's start on
2 CPU cores, far more for the real UNet on a TPU host, and paid again at every resume after a
preemption. Here the program is exported (`jax.export`, StableHLO) and stored under a key of
everything the trace reads: this package's source, the library versions, XLA's flags and jax's
settings, the devices and mesh, the abstract arguments with their shardings (so the keys of the
hyperparameter dict too), the networks' graph definitions, the stage's configs and noise schedule
and the step's options. A run whose key is stored deserializes the program and compiles it
(a hit in jax's cache when that is warm too); any other run exports and stores it first.

Both paths compile the same thing, a jitted call of the deserialized program: the processes of a
multi-host run agree on the program whichever of them found the file, and jax's cache entry of
the first run is the one the next run looks up. jax.export takes only flat argument lists here
(the networks' pure dicts have integer keys, which its serialization refuses), so the program's
arguments are the leaves of (state, consts, hyper, batch, noise, timesteps) and its results the
state's leaves and the metrics dict; `CompiledStep` restores the trees around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kandinsky_common.storage import location

_PACKAGES = ("flax_kandinsky", "kandinsky_common")
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl")
_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
SUFFIX = ".jaxexport"


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
                # never np.asarray(x): a device array would be copied to the host (and one
                # spanning other processes' devices cannot be)
                str(x.dtype) if hasattr(x, "dtype") else type(x).__name__,
                bool(getattr(x, "weak_type", False)),
                _stable_repr(getattr(x, "sharding", None)),
            )
            for x in leaves
        ],
    }


def step_key(*, stage, graphdefs, mesh, args: tuple, options: dict) -> str:
    """The hex key of the step traced for these networks, mesh and abstract arguments."""
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


@dataclass
class CompiledStep:
    """The compiled flat program, called like the jitted step.

    Parameters:
        compiled: the program over flat leaves -> (state leaves, metrics).
        state_tree: the state's tree structure, to rebuild the state it returns.
    """

    compiled: jax.stages.Compiled
    state_tree: Any

    def __call__(self, state, consts, hyper, batch, noise, timesteps):
        leaves, metrics = self.compiled(
            *jax.tree.leaves((state, consts, hyper, batch, noise, timesteps))
        )
        return jax.tree.unflatten(self.state_tree, leaves), metrics

    def cost_analysis(self):
        return self.compiled.cost_analysis()


def _flat_shardings(step, args: tuple) -> list:
    """One sharding per leaf of `args` = (state, consts, hyper, batch, noise, timesteps)."""
    state, consts, hyper, *inputs = args
    return [
        *jax.tree.leaves(step.state_shardings),
        *jax.tree.leaves(step.const_shardings),
        *[step.hyper_sharding] * len(jax.tree.leaves(hyper)),
        *[x.sharding for x in jax.tree.leaves(inputs)],
    ]


def _export(step, args: tuple, shardings: list, n_state: int) -> bytearray:
    """The step traced and lowered over flat leaves, serialized."""
    leaves, in_tree = jax.tree.flatten(args)

    def flat_step(*xs):
        state, metrics = step.fn(*jax.tree.unflatten(in_tree, xs))
        return jax.tree.leaves(state), metrics

    fn = jax.jit(
        flat_step,
        in_shardings=shardings,
        out_shardings=(shardings[:n_state], step.hyper_sharding),
        donate_argnums=tuple(range(n_state)),
    )
    return export.export(fn)(*leaves).serialize()


def load(path) -> export.Exported | None:
    if not path.exists():
        return None
    try:
        return export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # noqa: BLE001 - any unreadable entry is only a miss
        print(
            f"warning: the stored step program {path} did not load "
            f"({type(e).__name__}: {e}); tracing the step again",
            file=sys.stderr,
        )
        return None


def _store(path, blob: bytearray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a run killed mid-write, or a second process storing the
        # same key, never leaves a partial file under the key.
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(bytes(blob))
        tmp.replace(path)
    except OSError as e:  # the run goes on; the next one traces again
        print(f"warning: the step program was not stored in {path.parent} ({e})", file=sys.stderr)


def steps_folder(compile_cache_dir: str) -> str:
    """Where the step programs (and the start records of `start`) live in the compile cache."""
    return f"{compile_cache_dir}/kandinsky_steps"


def jit_program(program: export.Exported, shardings: list, hyper_sharding, n_state: int):
    """The jitted call of a deserialized step program. Both the stored path and the early load
    (`start.StepPreload`) compile through it, so they look up the same entry of jax's cache."""

    def train_step(*xs):  # named so that jax's logs call it jit_train_step, as the plain step
        return program.call(*xs)

    return jax.jit(
        train_step,
        in_shardings=shardings,
        out_shardings=(shardings[:n_state], hyper_sharding),
        donate_argnums=tuple(range(n_state)),
    )


def _spec(spec) -> list:
    """A PartitionSpec as JSON: one entry per dimension, None, an axis name or a list of them."""
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def recipe(key: str, shardings: list, leaves: list, hyper_sharding, n_state: int) -> dict | None:
    """What compiling the program stored under `key` reads, as JSON: the mesh, and per flat
    argument its shape, dtype, weak type, PartitionSpec and memory kind. None when a sharding is
    not a NamedSharding over the one mesh (such a step is not loaded early)."""
    mesh = hyper_sharding.mesh if isinstance(hyper_sharding, NamedSharding) else None
    everything = [*shardings, hyper_sharding]
    if mesh is None or any(not isinstance(s, NamedSharding) or s.mesh != mesh for s in everything):
        return None
    avals = [jax.typeof(x) for x in leaves]
    return {
        "key": key,
        "mesh": {
            "axes": list(mesh.axis_names),
            "shape": list(mesh.devices.shape),
            "devices": [d.id for d in mesh.devices.flat],
        },
        "n_state": n_state,
        "hyper": [_spec(hyper_sharding.spec), hyper_sharding.memory_kind],
        "leaves": [
            [list(a.shape), str(a.dtype), bool(a.weak_type), _spec(s.spec), s.memory_kind]
            for a, s in zip(avals, shardings)
        ],
    }


def from_recipe(r: dict) -> tuple[list, list, NamedSharding]:
    """(shardings, abstract arguments, hyper_sharding) rebuilt from a `recipe`."""
    by_id = {d.id: d for d in jax.devices()}
    devices = np.asarray([by_id[i] for i in r["mesh"]["devices"]]).reshape(r["mesh"]["shape"])
    mesh = Mesh(devices, tuple(r["mesh"]["axes"]))

    def named(spec, memory_kind):
        spec = P(*[tuple(e) if isinstance(e, list) else e for e in spec])
        return NamedSharding(mesh, spec, memory_kind=memory_kind)

    shardings = [named(spec, kind) for *_, spec, kind in r["leaves"]]
    avals = [
        jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), weak_type=weak, sharding=s)
        for (shape, dtype, weak, *_), s in zip(r["leaves"], shardings)
    ]
    return shardings, avals, named(*r["hyper"])


def compile_stored(step, args: tuple, folder, key: str, preload=None) -> CompiledStep:
    """`step` (a StepFn) compiled for `args` = (state, consts, hyper, batch, noise, timesteps),
    abstract or real, from the program stored under `key` in `folder` when there is one, else
    exported and stored there first. Calls with other shapes fail instead of compiling again.
    `preload` (a `start.StepPreload`) gives the executable when it loaded this very program
    early, and learns what this run compiles for the next one."""
    state = args[0]
    n_state = len(jax.tree.leaves(state))
    shardings = _flat_shardings(step, args)
    leaves = jax.tree.leaves(args)
    wanted = recipe(key, shardings, leaves, step.hyper_sharding, n_state)
    compiled = preload.take(wanted) if preload is not None else None
    if compiled is None:
        path = location(folder) / f"{key}{SUFFIX}"
        program = load(path)
        if program is None:
            blob = _export(step, args, shardings, n_state)
            _store(path, blob)
            # The fresh export goes through the same deserialization as a stored one, so that
            # a hit and a miss compile the very same program.
            program = export.deserialize(blob)
        fn = jit_program(program, shardings, step.hyper_sharding, n_state)
        compiled = fn.lower(*leaves).compile()
    if preload is not None:
        preload.remember(wanted)
    return CompiledStep(compiled, jax.tree.structure(state))
