"""TPU plan: compile the real-size training step for a TPU slice on this machine, with no TPU.

libtpu (the `tpu` extra) describes a TPU topology (`get_topology_desc`); the train step of
training/step.py, jitted with its shardings over a mesh of those devices, is lowered from
ShapeDtypeStructs and compiled by the TPU compiler, with no weight ever allocated. The compiled
program then reports what one core needs (`memory_analysis`) and costs (`cost_analysis`: flops
and a roofline time). Models are the published configs (model_configs.get_configs("real")),
built with `nnx.eval_shape`, so the plan sizes exactly what training would run.

Two feedings of the frozen encoders are planned: "step" (CLIP / MoVQ run inside every step on
pixels and tokens) and "cache" (the encode-once cache: the step receives encoder outputs and
holds no encoder at all).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from flax_kandinsky import sharding as sh
from flax_kandinsky.stages import STAGES, Stage
from flax_kandinsky.training.optim import LRSchedule, hyperparameters, make_optimizer
from flax_kandinsky.training.step import (
    abstract_inputs,
    init_state,
    make_train_step,
    split_stage,
    step_hyperparameters,
)
from kandinsky_common.errors import UserError
from kandinsky_common.flags import TrainConfig
from kandinsky_common.lora import LoraSettings
from kandinsky_common.model_configs import get_configs

GIB = 2**30
# TPU v3, per TensorCore (= one JAX device): 123 TFLOP/s bf16 and 32 GiB HBM per 2-core chip.
PEAK_FLOPS = 61.5e12
HBM_BYTES = 16 * GIB
# All-reduce bandwidth of a v3 pod (340 TB/s over 1024 chips), per core: an estimate of how
# fast FSDP's gathers and reductions move, which the roofline time leaves out.
ICI_BYTES_PER_S = 340e12 / 2048
SLICES = {"v3-8": "v3:2x2", "v3-32": "v3:4x4"}
FEEDINGS = ("step", "cache")
DTYPES = {"bf16": jnp.bfloat16, "fp32": None}


@dataclass(frozen=True)
class PlanSpec:
    """One training-step configuration to compile (per-core batch; accumulation 1)."""

    stage: str
    slice: str = "v3-8"  # a SLICES key, or a libtpu topology name such as "v3:2x2"
    mesh_shape: str | None = None  # "data=1,fsdp=8"; None: FSDP over the 8 cores of a host
    batch_per_core: int = 1
    resolution: int = 768  # decoder pixels (the prior's inputs are fixed)
    feeding: str = "step"
    precision: str = "bf16"  # compute dtype; params and optimizer state stay fp32
    remat: bool | str = True  # gradient_checkpointing: False, True or a UNet policy ("full")
    attention: str = "dot"  # or "chunked", as training's --attention
    use_ema: bool = True
    size: str = "real"  # model_configs size; "tiny" keeps tests fast
    lora_rank: int = 0  # > 0: a LoRA run of this rank (alpha = rank; the base frozen, no EMA)


def tpu_devices(slice_name: str) -> list:
    """The devices of a TPU slice described by libtpu: no TPU needed, nothing allocated."""
    from jax.experimental import topologies

    # Other JAX processes on this machine (a multi-host CPU run loads libtpu too) hold libtpu's
    # lock file; a topology description touches no TPU, so sharing the library is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = SLICES.get(slice_name, slice_name)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except (ImportError, RuntimeError, ValueError) as e:
        raise UserError(
            f"cannot describe TPU topology {name!r} ({e}); install the extra: "
            "pip install -e '.[tpu]'"
        ) from e
    return list(topo.devices)


def plan_mesh(devices: list, mesh_shape: str | None) -> Mesh:
    """("data", "fsdp") mesh; by default FSDP over each host's 8 cores, data across hosts, so
    the per-core state is that of a v3-8 and only gradients cross hosts."""
    n = len(devices)
    data, fsdp = sh.parse_mesh_shape(mesh_shape or f"fsdp={min(8, n)}", n)
    if data * fsdp != n:
        raise UserError(f"--mesh_shape {mesh_shape!r} must use all {n} cores of the slice")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, sh.AXES)


def abstract_stage(spec: PlanSpec) -> Stage:
    """The stage of `spec` from the published configs, shapes only."""
    if spec.stage not in STAGES:
        raise UserError(f"stage {spec.stage!r}: one of {tuple(STAGES)}")
    if spec.feeding not in FEEDINGS:
        raise UserError(f"feeding {spec.feeding!r}: one of {FEEDINGS}")
    dtype = DTYPES[spec.precision]
    cls = STAGES[spec.stage]
    lora = {}
    if spec.lora_rank:
        targets, prefix = cls.spec.lora_targets, cls.spec.model_subfolder
        lora["lora"] = LoraSettings(spec.lora_rank, float(spec.lora_rank), targets, prefix)
    return cls.from_configs(
        get_configs(spec.size),
        dtype=dtype,
        frozen_dtype=jnp.float32 if dtype is None else dtype,
        remat=spec.remat,
        attention=spec.attention,
        **lora,
    )


def lower_step(spec: PlanSpec, mesh: Mesh):
    """The jitted update of training/step.py for `spec` on `mesh`, lowered from shapes."""
    stage = abstract_stage(spec)
    cached = spec.feeding == "cache"
    graphdefs, params, consts = split_stage(stage)
    if cached:  # as training with the cache: the encoders never reach the devices
        consts = {"model_rest": consts["model_rest"]}
    cfg = TrainConfig(learning_rate=1e-5, lr_warmup_steps=0, use_ema=spec.use_ema)
    tx = make_optimizer(cfg, 1000)
    state = jax.eval_shape(lambda p: init_state(p, tx, spec.use_ema), params)
    step = make_train_step(
        stage, graphdefs, mesh, state, consts, use_ema=spec.use_ema, encoded=cached
    )
    b = spec.batch_per_core * mesh.size  # global batch; accumulation 1 (leading axis)
    inputs = abstract_inputs(stage, b, 1, spec.resolution, cached, mesh)
    hyper = step_hyperparameters(hyperparameters(cfg), LRSchedule(cfg, 1000), 0)
    return step.fn.lower(state, consts, hyper, *inputs)


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}
_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8})


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in an optimized HLO module (per device).

    An async `-start` returns (operands, results): the last shape is the result. Each kind is
    counted once per instruction, so this is what lands in each core's HBM, a proxy for traffic.
    """
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if not shapes:
            continue
        dt, dims = shapes[-1]
        n = math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dt]
        out[m.group(2)] = out.get(m.group(2), 0) + n
    return out


def model_flops(spec: PlanSpec) -> float:
    """Flops of one step as the model defines it (no remat recomputation), per core.

    The step is lowered for one CPU device with remat off and counted by XLA's HLO cost
    analysis before any optimisation, so the count is the program's, not the compiler's.
    """
    cpu = jax.devices("cpu")[:1]
    mesh = Mesh(np.asarray(cpu).reshape(1, 1), sh.AXES)
    n = len(tpu_devices(spec.slice))
    per_core = dataclasses.replace(spec, remat=False, batch_per_core=spec.batch_per_core * n)
    cost = lower_step(per_core, mesh).cost_analysis()
    return float(cost["flops"]) / n


def compile_step(spec: PlanSpec) -> dict:
    """Compile `spec` for its TPU slice; per-core memory and cost, or `fits: False` when the
    compiler runs out of HBM."""
    devices = tpu_devices(spec.slice)
    mesh = plan_mesh(devices, spec.mesh_shape)
    t0 = time.perf_counter()
    lowered = lower_step(spec, mesh)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA reports exhausted HBM as a runtime error
        if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
            return {"batch_per_core": spec.batch_per_core, "fits": False, "error": str(e)[:300]}
        raise
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    comm = collective_bytes(compiled.as_text())
    return {
        "batch_per_core": spec.batch_per_core,
        "global_batch": spec.batch_per_core * mesh.size,
        "mesh": dict(mesh.shape),
        "fits": total <= HBM_BYTES,
        "bytes": {
            "argument": mem.argument_size_in_bytes,
            "output": mem.output_size_in_bytes,
            "alias": mem.alias_size_in_bytes,
            "temp": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes,
            "total": total,
        },
        "hbm_fraction": total / HBM_BYTES,
        "hlo_flops": float(cost["flops"]),
        "hbm_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "est_seconds": float(cost["optimal_seconds"]),
        "collective_bytes": comm,
        "ici_seconds": sum(comm.values()) / ICI_BYTES_PER_S,
        "compile_seconds": round(seconds, 1),
    }
