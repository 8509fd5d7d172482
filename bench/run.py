"""Side-by-side benchmark of the flax and torch backends on this machine; see bench/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.worker import PREFIX, SKIP, steady
from kandinsky_common.folders import user_path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fixtures:
    prior: Path
    decoder: Path
    data: Path


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        JAX_PLATFORMS="cpu",  # no libtpu probing when libtpu is installed
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.pop("XLA_FLAGS", None)  # one XLA:CPU device, using every core, as a user's run
    return env


def _script(name: str, *args) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        check=True,
    ).stdout
    return out.split()


def fixtures(out: Path, size: str) -> Fixtures:
    """Random Kandinsky 2.2 folders of `size` and the 32-photo dataset, built once under out/."""
    models, data = out / "fixtures" / size, out / "fixtures" / "photos"
    if not (models / "decoder" / "model_index.json").exists():
        shutil.rmtree(models, ignore_errors=True)
        _script("make_tiny_kandinsky.py", "--out", models, "--size", size)
    if not (data / "metadata.jsonl").exists():
        shutil.rmtree(data, ignore_errors=True)
        _script("make_sample_dataset.py", "--out", data)
    return Fixtures(models / "prior", models / "decoder", data)


def worker(spec: dict, log: Path, timeout: float) -> dict:
    """Run bench.worker in a fresh process; {"error": ...} instead of raising, so one broken row
    does not cost the others."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.worker", json.dumps(spec)]
    try:
        with log.open("w") as err:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(), cwd=ROOT,
                timeout=timeout,
            )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (log: {log})"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = [x for x in log.read_text().splitlines() if x.strip()][-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]} (log: {log})"}
    return json.loads(lines[-1][len(PREFIX) :])


def train_spec(a, fx: Fixtures, backend, stage, out: Path, cache: Path | None, compile_dir=None):
    flags = {
        "pretrained_prior_model_name_or_path": fx.prior,
        "pretrained_decoder_model_name_or_path": fx.decoder,
        "train_data_dir": fx.data,
        "output_dir": out,
        "backend": backend,
        "train_batch_size": a.batch,
        "max_train_steps": a.updates,
        "checkpointing_steps": 10**6,  # only the final checkpoint, after the timed updates
        "learning_rate": 1e-4,
        "lr_warmup_steps": 0,
        "seed": 0,
        "resolution": a.resolution,
        "report_to": "none",
        "embeddings_cache": cache,
        "compile_cache_dir": compile_dir,
    }
    args = [x for k, v in flags.items() if v is not None for x in (f"--{k}", str(v))]
    return {
        "kind": "train",
        "cpus": a.cpus,
        "backend": backend,
        "stage": stage,
        "args": args,
        "samples_per_update": a.batch,  # one process, one device, no accumulation
        "flops": backend == "flax",
    }


def measure(a, out: Path, stage: str, size: str, cached: bool) -> dict:
    """One row: flax (cold, then warm compilation cache) and torch, interleaved."""
    fx = fixtures(out, size)
    name = f"{stage}-{size}-{'cache' if cached else 'nocache'}"
    cache = out / "embeddings" / f"{stage}-{size}" if cached else None
    compile_dir = out / "jax_cache" / f"{name}-{time.time_ns()}"  # cold on the first run
    runs: dict[str, list[dict]] = {"flax": [], "torch": []}
    for i in range(a.repeats):
        for backend in ("flax", "torch"):
            run_out = out / "runs" / f"{name}-{backend}-{i}"
            spec = train_spec(
                a, fx, backend, stage, run_out, cache, compile_dir if backend == "flax" else None
            )
            print(f"  {name} {backend} run {i + 1}/{a.repeats}", flush=True)
            result = worker(spec, out / "logs" / f"{name}-{backend}-{i}.log", a.timeout)
            shutil.rmtree(run_out, ignore_errors=True)
            runs[backend].append(result)
            if "error" in result:
                print(f"    failed: {result['error']}", flush=True)
    row = {"stage": stage, "size": size, "cache": cached, "runs": runs}
    for backend, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            row[backend] = {"error": results[0]["error"]}
            continue
        median = statistics.median([s for r in ok for s in steady(r["update_seconds"])])
        row[backend] = {
            "samples_per_second": ok[0]["samples_per_update"] / median,
            "median_update_seconds": median,
            "first_step_seconds": [r["first_step_seconds"] for r in ok],
            "step_flops": next((r["step_flops"] for r in ok if r.get("step_flops")), None),
        }
    flax, torch = row["flax"], row["torch"]
    if "error" not in flax and "error" not in torch:
        row["flax_over_torch"] = flax["samples_per_second"] / torch["samples_per_second"]
        if flax["step_flops"]:
            flax["gflops_per_second"] = flax["step_flops"] / flax["median_update_seconds"] / 1e9
            # The same math in eager torch (no recomputation in either): same flop count.
            torch["gflops_per_second"] = flax["step_flops"] / torch["median_update_seconds"] / 1e9
    return row


def _fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict], peak: float | None) -> str:
    head = (
        f"{'stage':8}{'size':7}{'cache':7}{'flax s/s':>10}{'torch s/s':>11}{'flax/torch':>12}"
        f"{'MFLOP/step':>12}{'flax GF/s':>11}{'%peak':>7}{'torch GF/s':>12}"
        f"{'TTFS flax cold':>16}{'warm':>7}{'torch':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        f, t = r["flax"], r["torch"]
        gf = f.get("gflops_per_second")
        ttfs = f.get("first_step_seconds", [])
        lines.append(
            f"{r['stage']:8}{r['size']:7}{'on' if r['cache'] else 'off':7}"
            f"{_fmt(f.get('samples_per_second'), '.1f'):>10}"
            f"{_fmt(t.get('samples_per_second'), '.1f'):>11}"
            f"{_fmt(r.get('flax_over_torch')):>12}"
            f"{_fmt(f['step_flops'] / 1e6 if f.get('step_flops') else None, '.0f'):>12}"
            f"{_fmt(gf, '.1f'):>11}{_fmt(100 * gf / peak if gf and peak else None, '.0f'):>7}"
            f"{_fmt(t.get('gflops_per_second'), '.1f'):>12}"
            f"{_fmt(ttfs[0] if ttfs else None, '.1f'):>16}"
            f"{_fmt(ttfs[1] if len(ttfs) > 1 else None, '.1f'):>7}"
            f"{_fmt(statistics.median(t['first_step_seconds']) if 'error' not in t else None, '.1f'):>7}"  # noqa: E501
        )
        for backend in ("flax", "torch"):
            if "error" in r[backend]:
                lines.append(f"    {backend} failed: {r[backend]['error']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench",
        description="Samples/s, time to first step and achieved GFLOP/s of the flax and torch "
        "backends, side by side on this machine (fp32, one process, one device).",
    )
    p.add_argument(
        "--out", type=user_path, required=True, help="folder for bench_results.json, logs, scratch"
    )
    p.add_argument("--stages", default="prior,decoder", help="comma-separated: prior,decoder")
    p.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny,small")
    p.add_argument("--cache", default="off,on", help="encode-once cache rows: off,on")
    p.add_argument("--updates", type=int, default=16, help=f"updates per run (> {SKIP + 1})")
    p.add_argument("--batch", type=int, default=4, help="--train_batch_size")
    p.add_argument("--resolution", type=int, default=64, help="decoder resolution")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per backend and row (flax: cold, then warm)"
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="pin every measured process to this many CPUs (default: all); 1 gives stable "
        "numbers on a busy machine, where a 2-thread torch step can stall 10x",
    )
    v = p.add_argument_group(
        "against the reference",
        "with --reference_scripts: whole runs of diffusers' scripts, --backend torch and "
        "--backend flax side by side (bench/versus.py); --stages and --sizes pick the rows",
    )
    v.add_argument(
        "--reference_scripts",
        type=user_path,
        default=None,
        help="folder with diffusers' train_text_to_image_{prior,decoder}.py "
        "(examples/kandinsky2_2/text_to_image of a diffusers checkout)",
    )
    v.add_argument("--short", type=int, default=8, help="updates of the short run")
    v.add_argument(
        "--long",
        type=int,
        default=200,
        help="updates of the long run (25 epochs of the 32 photos: enough that a step of a few "
        "ms stands out of the start-up's noise)",
    )
    v.add_argument("--no_recompile", dest="recompile", action="store_false",
                   help="skip measuring flax's cost of a new --max_train_steps")  # fmt: skip
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    v.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no")
    v.add_argument(
        "--results", type=user_path, default=None, help="where the JSON goes (bench/results)"
    )
    a = p.parse_args(argv)
    if a.reference_scripts is not None:
        if a.long <= a.short:
            p.error("--long must exceed --short")
        for stage in a.stages.split(","):
            script = Path(a.reference_scripts) / f"train_text_to_image_{stage}.py"
            if not script.is_file():
                p.error(f"--reference_scripts: {script} does not exist")
        return a
    if a.updates <= SKIP + 1:
        p.error(
            f"--updates must exceed {SKIP + 1}: {SKIP} warm-up updates and the last are not timed"
        )
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.reference_scripts is not None:
        from bench.versus import main as versus

        return versus(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print("fp32 matmul peak (numpy, jax, torch) ...", flush=True)
    peak = worker({"kind": "peak", "cpus": a.cpus}, out / "logs" / "peak.log", a.timeout)
    best = max((v for k, v in peak.items() if k in ("numpy", "jax", "torch")), default=None)
    rows = []
    for stage in a.stages.split(","):
        for size in a.sizes.split(","):
            for cached in (c == "on" for c in a.cache.split(",")):
                rows.append(measure(a, out, stage, size, cached))
    text = table(rows, best)
    if "error" in peak:
        note = f"matmul peak failed: {peak['error']}"
    else:
        note = (
            f"fp32 matmul {peak['n']}x{peak['n']} GFLOP/s: numpy {peak['numpy']:.0f}, "
            f"jax {peak['jax']:.0f}, torch {peak['torch']:.0f} ({peak['torch_threads']} threads, "
            f"{peak['cpus']} CPUs); "
            f"%peak is against {best:.0f}"
        )
    legend = (
        f"s/s = samples/s in steady state (median time of updates {SKIP + 1}..{a.updates - 1}, "
        f"pooled over {a.repeats} run(s)); TTFS = seconds from process start to the end of the "
        "first update (flax: cold, then warm persistent compilation cache); GF/s = XLA's flop "
        "count of the flax step / median update time (torch: same flops / its time)"
    )
    print(f"\n{note}\n{text}\n{legend}")
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version,
        # Other work on the machine skews every number; the load average says how much there was.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    config = {k: str(v) for k, v in vars(a).items()}
    result = {"machine": machine, "config": config, "peak": peak, "rows": rows}
    (out / "bench_results.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'bench_results.json'}")
    return 0
