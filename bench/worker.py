"""One measurement in a fresh process: a training run of one backend, or the matmul peak.

    python -m bench.worker '{"kind": "train", ...}'   (see bench.run for the fields)
    python -m bench.worker '{"kind": "peak"}'

The result is the last stdout line, prefixed with RESULT. A fresh process per run keeps the
frameworks' global state (jax config, compilation caches in memory, torch threads) from leaking
between rows, and makes "time to first step" include what a user waits for: imports, model and
data loading, compilation.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before any framework import: the origin of time-to-first-step

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

PREFIX = "RESULT "
SKIP = 2  # updates left out of the steady state: compilation, allocator and cache warm-up


def steady(update_seconds: list[float]) -> list[float]:
    """Updates 3..N-1. The flax loop reads an update's loss after dispatching the next one, so the
    time between two reads is one step of the device; the last read has no successor in flight
    and may find its step already done, so it is left out (of both backends, alike)."""
    return update_seconds[SKIP:-1]


def _capture_step(captured: dict) -> None:
    """Keep the flax loop's step as compiled ahead of time (StepFn.compile), for cost_analysis."""
    from flax_kandinsky.training.step import StepFn

    compile_step = StepFn.compile

    def compile_recording(self, *args, **kwargs):
        captured["compiled"] = compiled = compile_step(self, *args, **kwargs)
        return compiled

    StepFn.compile = compile_recording


def _step_flops(captured: dict) -> float | None:
    """XLA's own count of the compiled step's flops (after fusion; a while loop counts once)."""
    if "compiled" not in captured:
        return None
    cost = captured["compiled"].cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per executable
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def train(spec: dict) -> dict:
    from kandinsky_common.flags import parse_config

    cfg = parse_config(spec["args"], spec["stage"])
    loop = importlib.import_module(f"{spec['backend']}_kandinsky.training.loop")
    captured: dict = {}
    if spec["backend"] == "flax" and spec.get("flops"):
        _capture_step(captured)
    summary = loop.train(cfg, spec["stage"])
    end = time.perf_counter()
    seconds = summary["update_seconds"]
    # summary["seconds"] runs from the loop's start to the end of the export, just before return.
    loop_start = end - summary["seconds"]
    median = statistics.median(steady(seconds))
    return {
        "samples_per_update": spec["samples_per_update"],
        "update_seconds": seconds,
        "median_update_seconds": median,
        "samples_per_second": spec["samples_per_update"] / median,
        "startup_seconds": loop_start - START,
        "first_step_seconds": loop_start - START + seconds[0],
        "step_flops": _step_flops(captured),
        "loss_last": summary.get("loss_last"),
    }


def _rate(fn, flops: float, repeats: int) -> float:
    fn()  # warm-up: thread pools, compilation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def peak(spec: dict) -> dict:
    """fp32 square matmul GFLOP/s of numpy (BLAS), jax (XLA:CPU) and torch (oneDNN/BLAS)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n, repeats = spec.get("n", 2048), spec.get("repeats", 15)
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jmm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2.0 * n**3
    return {
        "n": n,
        "numpy": _rate(lambda: a @ b, flops, repeats),
        "jax": _rate(lambda: jmm(ja, jb).block_until_ready(), flops, repeats),
        "torch": _rate(lambda: torch.mm(ta, tb), flops, repeats),
        "torch_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("cpus"):
        # Before any framework starts its thread pools: XLA and torch both size them from the
        # affinity mask. One thread per backend is immune to the stalls that a parallel region
        # suffers when other processes take its cores.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: spec["cpus"]])
    result = {"train": train, "peak": peak}[spec["kind"]](spec)
    print(PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
