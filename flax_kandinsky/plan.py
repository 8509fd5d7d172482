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

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from flax_kandinsky import sharding as sh
from flax_kandinsky.models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from flax_kandinsky.models.layers import set_attention
from flax_kandinsky.models.movq import VQModel
from flax_kandinsky.models.prior import PriorTransformer
from flax_kandinsky.models.unet import UNet2DConditionModel
from flax_kandinsky.pretrained import build_abstract
from flax_kandinsky.stages import DecoderStage, PriorStage
from flax_kandinsky.training.optim import make_optimizer
from flax_kandinsky.training.step import init_state, make_train_step, split_stage
from kandinsky_common.errors import UserError
from kandinsky_common.flags import TrainConfig
from kandinsky_common.model_configs import get_configs
from kandinsky_common.schedule import NoiseSchedule

GIB = 2**30
# TPU v3, per TensorCore (= one JAX device): 123 TFLOP/s bf16 and 32 GiB HBM per 2-core chip.
PEAK_FLOPS = 61.5e12
HBM_BYTES = 16 * GIB
# All-reduce bandwidth of a v3 pod (340 TB/s over 1024 chips), per core: an estimate of how
# fast FSDP's gathers and reductions move, which the roofline time leaves out.
ICI_BYTES_PER_S = 340e12 / 2048
SLICES = {"v3-8": "v3:2x2", "v3-32": "v3:4x4"}
STAGES = ("prior", "decoder")
FEEDINGS = ("step", "cache")
CLIP_PIXELS = 224
TEXT_TOKENS = 77
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
    attention: str = "chunked"
    use_ema: bool = True
    size: str = "real"  # model_configs size; "tiny" keeps tests fast


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


def _from_cache(frozen, batch):
    """The encode-once cache: the batch already holds the encoder outputs."""
    return batch


class _Abstract:
    """What the abstract stages add to a Stage: attention choice, feeding, input shapes."""

    def use_attention(self, attention: str, cached: bool) -> None:
        set_attention(attention, self.model, *self.frozen.values())
        if cached:
            self.frozen, self.encode = {}, _from_cache


class AbstractPrior(_Abstract, PriorStage):
    """PriorStage built from configs with shapes only (no folders, no weights)."""

    def __init__(self, configs, *, dtype, remat, attention, cached):
        kw = dict(dtype=dtype, param_dtype=jnp.bfloat16 if dtype is not None else jnp.float32)
        self.frozen = {
            "text_encoder": build_abstract(
                lambda r: CLIPTextModelWithProjection(configs["text_encoder"], rngs=r, **kw)
            ),
            "image_encoder": build_abstract(
                lambda r: CLIPVisionModelWithProjection(configs["image_encoder"], rngs=r, **kw)
            ),
        }
        self.model = build_abstract(
            lambda r: PriorTransformer(
                configs["prior"], gradient_checkpointing=remat, dtype=dtype, rngs=r
            )
        )
        self.model_config = configs["prior"]
        self.schedule = NoiseSchedule.prior()
        self.use_attention(attention, cached)

    def batch_shapes(self, b: int, resolution: int, cached: bool) -> dict:
        e = self.model.config.embedding_dim
        if cached:
            return {
                "text_embeds": ((b, e), jnp.float32),
                "text_hidden_states": ((b, TEXT_TOKENS, e), jnp.float32),
                "text_mask": ((b, TEXT_TOKENS), jnp.bool_),
                "image_embeds": ((b, e), jnp.float32),
            }
        return {
            "text_input_ids": ((b, TEXT_TOKENS), jnp.int32),
            "text_mask": ((b, TEXT_TOKENS), jnp.bool_),
            "clip_pixel_values": ((b, 3, CLIP_PIXELS, CLIP_PIXELS), jnp.float32),
        }

    def noise_shape(self, b: int, resolution: int) -> tuple[int, ...]:
        return self.x0_shape(b, resolution)


class AbstractDecoder(_Abstract, DecoderStage):
    """DecoderStage built from configs with shapes only (no folders, no weights)."""

    def __init__(self, configs, *, dtype, remat, attention, cached):
        kw = dict(dtype=dtype, param_dtype=jnp.bfloat16 if dtype is not None else jnp.float32)
        self.frozen = {
            "image_encoder": build_abstract(
                lambda r: CLIPVisionModelWithProjection(configs["image_encoder"], rngs=r, **kw)
            ),
            "movq": build_abstract(lambda r: VQModel(configs["movq"], rngs=r, **kw)),
        }
        self.movq_config = configs["movq"]
        self.model = build_abstract(
            lambda r: UNet2DConditionModel(
                configs["unet"], dtype=dtype, gradient_checkpointing=remat, rngs=r
            )
        )
        self.model_config = configs["unet"]
        self.schedule = NoiseSchedule.from_config(configs["decoder_scheduler"])
        self.embed_dim = configs["image_encoder"]["projection_dim"]
        self.use_attention(attention, cached)

    def batch_shapes(self, b: int, resolution: int, cached: bool) -> dict:
        if cached:
            return {
                "latents": (self.noise_shape(b, resolution), jnp.float32),
                "image_embeds": ((b, self.embed_dim), jnp.float32),
            }
        return {
            "pixel_values": ((b, 3, resolution, resolution), jnp.float32),
            "clip_pixel_values": ((b, 3, CLIP_PIXELS, CLIP_PIXELS), jnp.float32),
        }

    def noise_shape(self, b: int, resolution: int) -> tuple[int, ...]:
        n, c, h, w = self.x0_shape(b, resolution)
        return (n, h, w, c)  # the step's NHWC x0 layout


def abstract_stage(spec: PlanSpec):
    if spec.stage not in STAGES:
        raise UserError(f"stage {spec.stage!r}: one of {STAGES}")
    if spec.feeding not in FEEDINGS:
        raise UserError(f"feeding {spec.feeding!r}: one of {FEEDINGS}")
    cls = AbstractPrior if spec.stage == "prior" else AbstractDecoder
    return cls(
        get_configs(spec.size),
        dtype=DTYPES[spec.precision],
        remat=spec.remat,
        attention=spec.attention,
        cached=spec.feeding == "cache",
    )


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def lower_step(spec: PlanSpec, mesh: Mesh):
    """The jitted update of training/step.py for `spec` on `mesh`, lowered from shapes."""
    stage = abstract_stage(spec)
    graphdefs, params, consts = split_stage(stage)
    cfg = TrainConfig(learning_rate=1e-5, lr_warmup_steps=0, use_ema=spec.use_ema)
    tx = make_optimizer(cfg, 1000)
    state = jax.eval_shape(lambda p: init_state(p, tx, spec.use_ema), params)
    step = make_train_step(
        stage, graphdefs, tx, mesh, state, consts, snr_gamma=None, use_ema=spec.use_ema
    )
    b = spec.batch_per_core * mesh.size  # global batch; accumulation 1 (leading axis)
    shapes = stage.batch_shapes(b, spec.resolution, spec.feeding == "cache")
    batch = {k: _sds((1, *s), d) for k, (s, d) in shapes.items()}
    noise = _sds((1, *stage.noise_shape(b, spec.resolution)), jnp.float32)
    timesteps = _sds((1, b), jnp.int32)
    return step.fn.lower(state, consts, batch, noise, timesteps)


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


def _in_fresh_process(fn, spec: PlanSpec):
    """fn(spec) in a new process: a real-size compile takes 12-18 GB of host memory, which a
    long-lived process would keep and fragment from one compile to the next."""
    # Fewer glibc arenas: the compiler's many threads otherwise inflate the peak (~15% measured).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(fn, spec).result()
    except concurrent.futures.process.BrokenProcessPool as e:
        raise UserError(
            "the compiling process died (out of host memory?); free memory and rerun: finished "
            "compiles are kept"
        ) from e


class Memo:
    """Finished compiles, one JSON line each, so an interrupted plan resumes where it stopped
    (real-size compiles take minutes). Keyed by the spec: delete the file after model changes.
    `isolate` runs each compile and flop count in a process of its own."""

    def __init__(self, path: str | os.PathLike | None = None, isolate: bool = False):
        self.path = None if path is None else Path(path)
        self.isolate = isolate
        self.done: dict[str, object] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                self.done[rec["key"]] = rec["value"]

    def __call__(self, fn, spec: PlanSpec):
        key = f"{fn.__name__} {json.dumps(dataclasses.asdict(spec), sort_keys=True)}"
        if key not in self.done:
            self.done[key] = _in_fresh_process(fn, spec) if self.isolate else fn(spec)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "value": self.done[key]}) + "\n")
        return self.done[key]


def with_rates(result: dict, flops: float) -> dict:
    """Add model flops and MFU: against the roofline time (the compiler's estimate), and with
    the collectives' time added as if none overlapped compute (a floor)."""
    t = result["est_seconds"]
    return {
        **result,
        "model_flops": flops,
        "mfu": flops / (t * PEAK_FLOPS),
        "mfu_no_overlap": flops / ((t + result["ici_seconds"]) * PEAK_FLOPS),
        "samples_per_second": result["global_batch"] / max(t, result["ici_seconds"]),
    }


def _next_batch(tried: dict, lo: int, hi: int, limit: int) -> int:
    """Where the per-core memory line crosses 16 GiB, from the compiles nearest the edge:
    between the largest fit and the smallest misfit, or past the two largest fits."""

    def total(b):
        return tried[b].get("bytes", {}).get("total")

    fits = sorted(b for b, r in tried.items() if r["fits"] and "bytes" in r)
    if hi <= limit and lo > 0 and total(hi) is not None:
        (b0, m0), (b1, m1) = (lo, total(lo)), (hi, total(hi))
    elif hi > limit and len(fits) >= 2:
        (b0, m0), (b1, m1) = (fits[-2], total(fits[-2])), (fits[-1], total(fits[-1]))
    else:  # nothing to draw a line through: bisect, or double while nothing failed
        return (lo + hi) // 2 if hi <= limit else min(2 * lo, limit)
    slope = max((m1 - m0) / (b1 - b0), 1.0)
    guess = b0 + int((HBM_BYTES - m0) / slope)
    return min(max(guess, lo + 1), hi - 1, limit)


def max_batch(
    spec: PlanSpec, first: dict, limit: int, hint: int | None = None, log=print, memo=None
) -> tuple[int, list[dict]]:
    """Largest per-core batch <= limit that fits, from `first` (spec's own compile).

    Memory grows about linearly in the batch, so each next compile is where the line through
    the compiles nearest the edge crosses 16 GiB, and its neighbour on the far side settles the
    edge; `hint` (the edge found on another slice with the same per-core state) is tried first.
    Returns (batch, every compile's result, by batch).
    """
    tried = {first["batch_per_core"]: first}

    def fits(b: int) -> bool:
        if b not in tried:
            r = (memo or Memo())(compile_step, dataclasses.replace(spec, batch_per_core=b))
            tried[b] = r
            log(f"  batch {b}/core: " + (_gib(r) if "bytes" in r else "out of memory"))
        return tried[b]["fits"]

    def bracket() -> tuple[int, int]:
        lo = max((b for b, r in tried.items() if r["fits"]), default=0)
        hi = min((b for b, r in tried.items() if not r["fits"] and b > lo), default=limit + 1)
        return lo, hi

    lo, hi = bracket()
    guess = hint if hint and lo < hint < hi else _next_batch(tried, lo, hi, limit)
    while hi - lo > 1:
        if fits(guess):
            if guess + 1 < hi:
                fits(guess + 1)
        elif guess - 1 > lo:
            fits(guess - 1)
        lo, hi = bracket()
        guess = _next_batch(tried, lo, hi, limit)
    return lo, [tried[b] for b in sorted(tried)]


def _gib(r: dict) -> str:
    return f"{r['bytes']['total'] / GIB:.2f} GiB" + ("" if r["fits"] else " (over)")


def plan(
    spec: PlanSpec, *, search_limit: int = 0, hint: int | None = None, log=print, memo=None
) -> dict:
    """Compile `spec`, add model flops and MFU, and (search_limit > 0) the largest per-core
    batch that fits, searched up to search_limit, with its own rates."""
    memo = memo or Memo()
    log(f"{spec.stage} {spec.slice} feeding={spec.feeding} batch {spec.batch_per_core}/core")
    result = memo(compile_step, spec)
    if "bytes" in result:
        log(f"  compiled in {result['compile_seconds']} s: {_gib(result)}")
        result = with_rates(result, memo(model_flops, spec))
    out = {"spec": dataclasses.asdict(spec), "result": result}
    if search_limit:
        best, tried = max_batch(spec, result, search_limit, hint, log, memo)
        out["max_batch_per_core"] = best
        out["search_limit"] = search_limit
        out["search"] = [
            {"batch_per_core": r["batch_per_core"], "fits": r["fits"]}
            | ({"total_bytes": r["bytes"]["total"]} if "bytes" in r else {})
            | ({"compile_seconds": r["compile_seconds"]} if "compile_seconds" in r else {})
            for r in tried
        ]
        at_best = next((r for r in tried if r["batch_per_core"] == best), None)
        if at_best is not None and best != spec.batch_per_core:
            at = dataclasses.replace(spec, batch_per_core=best)
            out["at_max_batch"] = with_rates(at_best, memo(model_flops, at))
        elif best == spec.batch_per_core:
            out["at_max_batch"] = result
    return out


def run_plans(
    specs: list[PlanSpec], limits: dict[str, int], log=print, memo_path=None, isolate=False
) -> list[dict]:
    """Plan every spec; a stage's batch edge on one slice is the search hint on the next."""
    memo = Memo(memo_path, isolate)
    edges: dict[tuple, int] = {}
    plans = []
    for spec in specs:
        key = (spec.stage, spec.feeding)
        limit = limits.get(spec.stage, 0)
        entry = plan(spec, search_limit=limit, hint=edges.get(key), log=log, memo=memo)
        if "max_batch_per_core" in entry:
            edges[key] = entry["max_batch_per_core"]
        plans.append(entry)
    return plans


def _num(x: float) -> str:
    return f"{x:.3g}"


def table(plans: list[dict]) -> str:
    """Markdown results table: one row per stage x slice x feeding."""
    head = (
        "| stage | slice (mesh) | encoders | batch/core | HBM/core of 16 GiB | TFLOP/step/core "
        "(model / compiled) | est. step | est. MFU (no-overlap floor) | max batch/core "
        "(MFU there) |"
    )
    rows = [head, "|" + "---|" * 9]
    for p in plans:
        s, r = p["spec"], p["result"]
        mesh = "x".join(str(v) for v in r.get("mesh", {}).values())
        enc = "in step" if s["feeding"] == "step" else "cache"
        if "bytes" not in r:
            rows.append(f"| {s['stage']} | {s['slice']} | {enc} | {s['batch_per_core']} | "
                        "out of memory | | | | |")  # fmt: skip
            continue
        best = p.get("max_batch_per_core")
        at = p.get("at_max_batch")
        best_s = "—" if best is None else f"{best}"
        if best is not None and best >= p.get("search_limit", 0):
            best_s = f"≥ {best}"
        if at is not None and "mfu" in at:
            best_s += f" ({at['mfu']:.0%})"
        rows.append(
            f"| {s['stage']} | {s['slice']} ({mesh}) | {enc} | {s['batch_per_core']} | "
            f"{r['bytes']['total'] / GIB:.2f} GiB ({r['hbm_fraction']:.0%}) | "
            f"{_num(r['model_flops'] / 1e12)} / {_num(r['hlo_flops'] / 1e12)} | "
            f"{r['est_seconds'] * 1e3:.0f} ms | {r['mfu']:.0%} ({r['mfu_no_overlap']:.0%}) | "
            f"{best_s} |"
        )
    return "\n".join(rows)


def write_results(plans: list[dict], out_dir: str | os.PathLike) -> str:
    """<out_dir>/<slice>.json per slice and <out_dir>/table.md; returns the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(p["spec"]["slice"] for p in plans):
        mine = [p for p in plans if p["spec"]["slice"] == name]
        (out / f"{name}.json").write_text(json.dumps({"plans": mine}, indent=1) + "\n")
    text = table(plans)
    (out / "table.md").write_text(text + "\n")
    return text
