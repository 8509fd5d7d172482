"""TPU plan, the search and the report: runs plan.compile_step per spec (each real-size compile in
a process of its own, resumable from a JSON-lines memo), finds the largest per-core batch that
fits in HBM, adds MFU, and writes <slice>.json files and a markdown table (scripts/tpu_plan.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
from pathlib import Path

from flax_kandinsky.tpu_plan import GIB, HBM_BYTES, PEAK_FLOPS, PlanSpec, compile_step, model_flops
from kandinsky_common.errors import UserError


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

    def other_batches(self, spec: PlanSpec) -> dict[int, dict]:
        """Finished compiles of `spec` at other per-core batches: a search starts from them."""
        want = {**dataclasses.asdict(spec), "batch_per_core": None}
        found = {}
        for key, value in self.done.items():
            name, _, text = key.partition(" ")
            if name == compile_step.__name__:
                other = json.loads(text)
                b = other.pop("batch_per_core")
                if {**other, "batch_per_core": None} == want:
                    found[b] = value
        return found


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


# A compile that runs out of HBM says how much it needed: "... HLO temporaries (17.62G) exceeds
# available HBM (15.48G)". That point on the memory line keeps the search from bisecting blind.
_REQUIRED = re.compile(r"\(([\d.]+)G\) exceeds")


def _total(result: dict) -> float | None:
    if "bytes" in result:
        return result["bytes"]["total"]
    need = _REQUIRED.search(result.get("error", ""))
    return float(need.group(1)) * GIB if need else None


def _next_batch(tried: dict, lo: int, hi: int, limit: int) -> int:
    """Where the per-core memory line crosses 16 GiB: through the largest fit and the smallest
    misfit (its need, when it ran out of HBM), else through the two largest fits."""
    fits = sorted(b for b, r in tried.items() if r["fits"] and "bytes" in r)
    if hi <= limit and lo > 0 and _total(tried[hi]) is not None:
        (b0, m0), (b1, m1) = (lo, _total(tried[lo])), (hi, _total(tried[hi]))
    elif len(fits) >= 2:
        # The two largest fits follow a curving line best, unless noise flattens them.
        near = fits[-2] if _total(tried[fits[-1]]) > _total(tried[fits[-2]]) else fits[0]
        (b0, m0), (b1, m1) = (near, _total(tried[near])), (fits[-1], _total(tried[fits[-1]]))
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
    if memo is not None:  # an interrupted or earlier search: its compiles bound the edge already
        tried.update({b: r for b, r in memo.other_batches(spec).items() if b <= limit})

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
    """Plan every spec, searching the batch up to limits["stage:feeding"] or limits["stage"] (0:
    no search); a stage's batch edge on one slice is the search hint on the next."""
    memo = Memo(memo_path, isolate)
    edges: dict[tuple, int] = {}
    plans = []
    for spec in specs:
        key = (spec.stage, spec.feeding)
        limit = limits.get(f"{spec.stage}:{spec.feeding}", limits.get(spec.stage, 0))
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
        stage = s["stage"] + (f" LoRA r{s['lora_rank']}" if s.get("lora_rank") else "")
        if "bytes" not in r:
            rows.append(f"| {stage} | {s['slice']} | {enc} | {s['batch_per_core']} | "
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
            f"| {stage} | {s['slice']} ({mesh}) | {enc} | {s['batch_per_core']} | "
            f"{r['bytes']['total'] / GIB:.2f} GiB ({r['hbm_fraction']:.0%}) | "
            f"{_num(r['model_flops'] / 1e12)} / {_num(r['hlo_flops'] / 1e12)} | "
            f"{r['est_seconds'] * 1e3:.0f} ms | {r['mfu']:.0%} ({r['mfu_no_overlap']:.0%}) | "
            f"{best_s} |"
        )
    return "\n".join(rows)


def write_results(plans: list[dict], out_dir: str | os.PathLike) -> str:
    """<out_dir>/<slice>.json per slice planned here (<slice>-lora.json for LoRA rows), and
    <out_dir>/table.md over every JSON in out_dir (plans of other slices from earlier runs
    included); returns this run's table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def file_of(p: dict) -> str:  # LoRA rows apart, so that either kind is planned alone
        return p["spec"]["slice"] + ("-lora" if p["spec"].get("lora_rank") else "")

    for name in dict.fromkeys(map(file_of, plans)):
        mine = [p for p in plans if file_of(p) == name]
        (out / f"{name}.json").write_text(json.dumps({"plans": mine}, indent=1) + "\n")

    def cores(f: Path):  # v3-8 before v3-32, full fine-tunes before LoRA
        size = re.search(r"v\d-(\d+)", f.stem)
        return (f.stem.endswith("-lora"), int(size.group(1)) if size else 0, f.stem)

    files = sorted(out.glob("*.json"), key=cores)
    every = [p for f in files for p in json.loads(f.read_text())["plans"]]
    (out / "table.md").write_text(table(every) + "\n")
    return table(plans)
