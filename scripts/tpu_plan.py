#!/usr/bin/env python
"""Compile the real-size training steps for TPU v3 slices on this machine (no TPU) and report
per-core memory, flops, estimated step time and MFU, and the largest per-core batch that fits.

    pip install -e '.[jax,tpu]'
    python scripts/tpu_plan.py --search --output_dir plans      # both stages, v3-8 and v3-32

Writes <output_dir>/<slice>.json per slice and <output_dir>/table.md. Each real-size compile takes
minutes on a CPU; --search adds a few compiles per row (see flax_kandinsky/plan.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kandinsky_common.errors import UserError, run_cli


def per_stage(text: str, cast) -> dict:
    """'prior=8,decoder=1' -> {'prior': 8, 'decoder': 1}."""
    try:
        return {k: cast(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError as e:
        raise UserError(f"{text!r}: write it as 'prior=VALUE,decoder=VALUE'") from e


def on_off(v: str) -> bool:
    if v not in ("on", "off"):
        raise ValueError(v)
    return v == "on"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="prior,decoder")
    p.add_argument("--slices", default="v3-8,v3-32", help="v3-8, v3-32 or libtpu names (v3:2x2)")
    p.add_argument("--feedings", default="step,cache", help="encoders in the step / from cache")
    p.add_argument("--batch_per_core", default="prior=8,decoder=1")
    p.add_argument("--remat", default="prior=off,decoder=on", help="gradient checkpointing")
    p.add_argument("--mesh_shape", default="fsdp=8", help="data=-1 fills the rest of the slice")
    p.add_argument("--resolution", type=int, default=768, help="decoder training resolution")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--attention", default="chunked", choices=("dot", "chunked"))
    p.add_argument("--no_ema", action="store_true", help="plan without the EMA copy")
    p.add_argument("--search", action="store_true", help="find the largest per-core batch")
    p.add_argument("--search_limit", default="prior=512,decoder=64")
    p.add_argument("--size", default="real", help="model_configs size (tiny: a quick check)")
    p.add_argument("--output_dir", default="plans")

    def run(args):
        from flax_kandinsky.plan import PlanSpec, run_plans, table

        a = p.parse_args(args)
        batch, remat = per_stage(a.batch_per_core, int), per_stage(a.remat, on_off)
        limits = per_stage(a.search_limit, int) if a.search else {}
        specs = [
            PlanSpec(
                stage,
                slice_,
                a.mesh_shape,
                batch[stage],
                a.resolution,
                feeding,
                a.precision,
                remat[stage],
                a.attention,
                not a.no_ema,
                a.size,
            )  # fmt: skip
            for slice_ in a.slices.split(",")
            for stage in a.stages.split(",")
            for feeding in a.feedings.split(",")
        ]
        plans = run_plans(specs, limits)
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for slice_ in a.slices.split(","):
            mine = [x for x in plans if x["spec"]["slice"] == slice_]
            (out / f"{slice_}.json").write_text(json.dumps({"plans": mine}, indent=1) + "\n")
        text = table(plans)
        (out / "table.md").write_text(text + "\n")
        print(text)
        return 0

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
