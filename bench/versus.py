"""Our two backends against the diffusers reference scripts, as users run them: whole processes.

    python scripts/bench.py --reference_scripts DIR [--out DIR] [--stages ...] [--sizes ...]

DIR holds diffusers' `train_text_to_image_{prior,decoder}.py` (examples/kandinsky2_2/
text_to_image of a diffusers checkout), run unmodified. For every row (stage x fixture size) the
three runners (reference, `--backend torch`, `--backend flax`) train the same fixtures with the
same flags (batch 4, seed 0, everything else at its default) in fresh processes, timed from
launch to exit:
- s/update = (T(long) - T(short)) / (long - short): start-up, the final save and anything else
  paid once cancel, data loading and logging count;
- fixed s = T(short) - short * s/update: what a run pays besides its updates (imports, model
  loading, compilation, the final save), the figure a user waits before the first update plus
  the save;
- first update s = launch to the progress bar's first tick (`1/N`), read from the output as it
  is written: start-up plus the first update, what a user waits to see training begin;
- recompile s (flax) = T(a length not run before) - T(the same length again): what changing
  --max_train_steps costs with a warm persistent compilation cache.
Every runner first does one untimed short run (file caches, the flax compilation cache), and
each timed run is repeated `--repeats` times (the minimum counts: other work only adds time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.run import ROOT, _env, fixtures
from kandinsky_common.stage_spec import SPECS

RUNNERS = ("reference", "torch", "flax")
RESOLUTION = {"tiny": 64, "small": 128}  # decoder pixels per fixture size (the prior has none)


def device_env(device: str) -> dict:
    """The environment of every measured process: bench.run's (offline, one XLA device), on the
    device asked for."""
    env = _env()  # JAX_PLATFORMS=cpu
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["JAX_PLATFORMS"] = "cuda"
    return env


def describe_device(device: str, env: dict) -> str:
    """What the measured processes compute on, in words, asked of the frameworks themselves."""
    probe = (
        "import jax, torch\n"
        "d = jax.devices()[0]\n"
        "t = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'\n"
        "print(f'jax: {d.platform} {d.device_kind} x{jax.device_count()}; torch: {t}; "
        'cpus: {len(__import__("os").sched_getaffinity(0))}\')'
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300
    )
    return proc.stdout.strip() or f"{device} (probe failed: {proc.stderr.strip()[-200:]})"


def command(
    a, runner: str, stage: str, size: str, fx, out: Path, steps: int, jax_cache: Path | None = None
) -> list[str]:
    script = f"train_text_to_image_{stage}.py"
    if runner == "reference":
        cmd = [sys.executable, str(Path(a.reference_scripts) / script)]
    else:
        cmd = [sys.executable, str(ROOT / "scripts" / script), "--backend", runner]
    flags = {
        "pretrained_prior_model_name_or_path": fx.prior,
        "pretrained_decoder_model_name_or_path": fx.decoder,
        "train_data_dir": fx.data,
        "output_dir": out,
        "train_batch_size": a.batch,
        "max_train_steps": steps,
        "seed": 0,
    }
    if SPECS[stage].uses_resolution:
        flags["resolution"] = RESOLUTION[size]
    if a.mixed_precision != "no":
        flags["mixed_precision"] = a.mixed_precision
    if runner == "flax":
        # warmed by the untimed run; `jax_cache` gives the cold run an empty one
        flags["compile_cache_dir"] = jax_cache or Path(a.out) / "jax_cache"
    return cmd + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


# A tqdm bar's first tick ("| 1/8 [" in the reference's bar and in ours): the first update done.
FIRST_UPDATE = re.compile(rb"\|\s*1/\d+ \[")


def timed(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[float, float | None]:
    """Seconds from launch to exit of one run, and from launch to its progress bar's first tick
    (None when none showed); raises with the log's last line on failure. The output is read as
    it comes, so the tick is timed when it is written."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    first, seen = None, b""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        with log.open("wb") as f:
            while chunk := proc.stdout.read1(1 << 16):
                f.write(chunk)
                if first is None:
                    seen = seen[-256:] + chunk  # a tick split over two reads still matches
                    if FIRST_UPDATE.search(seen):
                        first = time.perf_counter() - start
        proc.wait()
    finally:
        watchdog.cancel()
    seconds = time.perf_counter() - start
    if seconds >= timeout and proc.returncode != 0:
        raise subprocess.TimeoutExpired(cmd, timeout)
    if proc.returncode != 0:
        tail = [x for x in log.read_text().splitlines() if x.strip()][-1:] or ["no output"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0][:300]} (log: {log})")
    return seconds, first


def measure(a, env: dict, stage: str, size: str) -> dict:
    """One row: every runner's s/update, fixed cost and (flax) recompile cost."""
    fx = fixtures(Path(a.out), size)
    row: dict = {"stage": stage, "size": size}
    name = f"{stage}-{size}"
    for runner in RUNNERS:
        if runner == "reference" and not a.reference_scripts:
            continue
        scratch = Path(a.out) / "runs" / f"{name}-{runner}"

        def run(steps: int, tag: str, runner=runner, scratch=scratch, jax_cache=None) -> tuple:
            shutil.rmtree(scratch, ignore_errors=True)
            cmd = command(a, runner, stage, size, fx, scratch, steps, jax_cache)
            print(f"  {name} {runner} {tag} ({steps} updates)", flush=True)
            log = Path(a.out) / "logs" / f"{name}-{runner}-{tag}.log"
            try:
                return timed(cmd, env, log, a.timeout)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

        try:
            cold = None
            if runner == "flax":  # first update with nothing compiled before (the warm-up warms)
                empty = Path(a.out) / "runs" / "empty-jax-cache"
                shutil.rmtree(empty, ignore_errors=True)
                cold = run(a.short, "cold", jax_cache=empty)[1]
                shutil.rmtree(empty, ignore_errors=True)
            run(a.short, "warm-up")
            shorts = [run(a.short, f"short{i}") for i in range(a.repeats)]
            short = min(s for s, _ in shorts)
            long = min(run(a.long, f"long{i}")[0] for i in range(a.repeats))
            per_update = (long - short) / (a.long - a.short)
            ticks = [t for _, t in shorts if t is not None]
            result = {
                "short_seconds": short,
                "long_seconds": long,
                "seconds_per_update": per_update,
                "fixed_seconds": short - a.short * per_update,
                "first_update_seconds": min(ticks) if ticks else None,
            }
            if cold is not None:
                result["first_update_cold_seconds"] = cold
            if runner == "flax" and a.recompile:
                new = a.long + a.short  # a length this cache has not seen
                first, again = run(new, "new-length")[0], run(new, "new-length-again")[0]
                result["recompile_seconds"] = first - again
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            result = {"error": str(e)}
            print(f"    failed: {e}", flush=True)
        row[runner] = result
    ref = row.get("reference", {})
    for runner in ("torch", "flax"):
        ours = row.get(runner, {})
        if "seconds_per_update" in ours and "seconds_per_update" in ref:
            row[f"{runner}_speedup"] = ref["seconds_per_update"] / ours["seconds_per_update"]
    return row


def _f(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """The markdown table the README quotes."""
    lines = [
        "| stage | size | reference s/update | torch | flax | flax vs reference | torch vs "
        "reference | first update s: ref / torch / flax | flax cold-cache first update s "
        "| fixed s: ref / torch / flax | flax recompile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = {k: r.get(k, {}).get("seconds_per_update") for k in RUNNERS}
        fixed = " / ".join(_f(r.get(k, {}).get("fixed_seconds"), ".1f") for k in RUNNERS)
        first = " / ".join(_f(r.get(k, {}).get("first_update_seconds"), ".1f") for k in RUNNERS)
        pixels = SPECS[r["stage"]].uses_resolution
        size = r["size"] + (f", {RESOLUTION[r['size']]} px" if pixels else "")
        lines.append(
            f"| {r['stage']} | {size} | {_f(per['reference'], '.3f')} | {_f(per['torch'], '.3f')}"
            f" | {_f(per['flax'], '.3f')} | {_f(r.get('flax_speedup'), '.2f')}x"
            f" | {_f(r.get('torch_speedup'), '.2f')}x | {first}"
            f" | {_f(r.get('flax', {}).get('first_update_cold_seconds'), '.1f')} | {fixed}"
            f" | {_f(r.get('flax', {}).get('recompile_seconds'), '+.1f')} |"
        )
        for k in RUNNERS:
            if "error" in r.get(k, {}):
                lines.append(f"<!-- {k} failed: {r[k]['error']} -->")
    return "\n".join(lines)


def main(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = a.device
    if device == "auto":
        device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    env = device_env(device)
    described = describe_device(device, env)
    print(f"device: {described}", flush=True)
    load_before = os.getloadavg()
    rows = [measure(a, env, s, z) for s in a.stages.split(",") for z in a.sizes.split(",")]
    text = table(rows)
    legend = (
        f"batch {a.batch}, seed 0, default flags, precision {a.mixed_precision}; s/update = "
        f"(T({a.long}) - T({a.short})) / {a.long - a.short} over whole processes (min of "
        f"{a.repeats}); first update = launch to the progress bar's first tick (warm caches; "
        "flax's cold one: an empty compilation cache); "
        f"fixed s = T({a.short}) - {a.short} x s/update; recompile = first minus "
        "second run of a new --max_train_steps, warm compilation cache"
    )
    print(f"\ndevice: {described}\n{text}\n{legend}")
    result = {
        "device": described,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "config": {k: str(v) for k, v in vars(a).items()},
        "rows": rows,
        "table": text,
    }
    results = Path(a.results) if a.results else ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    name = f"{stamp}-versus-reference-{device}{os.cpu_count()}"
    path = results / f"{name}.json"
    for n in range(2, 100):  # a second run of the day keeps the first's figures
        if not path.exists():
            break
        path = results / f"{name}-{n}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
