#!/usr/bin/env python
"""Compile the real-size training steps for TPU v3 slices on this machine (no TPU) and report
per-core memory, flops, estimated step time and MFU, and the largest per-core batch that fits.

    pip install -e '.[jax,tpu]'
    python scripts/tpu_plan.py --search --output_dir plans      # both stages, v3-8 and v3-32

Writes <output_dir>/<slice>.json per slice and <output_dir>/table.md (every slice's JSON in
output_dir, so slices can be planned by separate runs). Each real-size compile takes
minutes on a CPU; --search adds a few compiles per row (see flax_kandinsky/tpu_plan.py). Finished
compiles are kept in <output_dir>/compiles.jsonl: a rerun resumes (delete it after model changes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kandinsky_common.errors import UserError, run_cli
from kandinsky_common.folders import user_path

REMAT = {"on": True, "off": False, "full": "full"}  # on = the models' gradient checkpointing


def per_stage(text: str, cast) -> dict:
    """'prior=8,decoder=1' -> {'prior': 8, 'decoder': 1}."""
    try:
        return {k: cast(v) for k, v in (part.split("=") for part in text.split(","))}
    except (ValueError, KeyError) as e:
        raise UserError(f"{text!r}: write it as 'prior=VALUE,decoder=VALUE'") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="prior,decoder")
    p.add_argument("--slices", default="v3-8,v3-32", help="v3-8, v3-32 or libtpu names (v3:2x2)")
    p.add_argument("--feedings", default="step,cache", help="encoders in the step / from cache")
    p.add_argument("--batch_per_core", default="prior=8,decoder=1")
    p.add_argument(
        "--remat", default="prior=off,decoder=on", help="on (UNet: keep convs), full, off"
    )
    p.add_argument("--mesh_shape", default="fsdp=8", help="data=-1 fills the rest of the slice")
    p.add_argument("--resolution", type=int, default=768, help="decoder training resolution")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument(
        "--attention",
        default="dot",
        choices=("dot", "chunked"),
        help="as training's --attention (chunked: more host memory to compile the decoder step)",
    )
    p.add_argument("--no_ema", action="store_true", help="plan without the EMA copy")
    p.add_argument("--lora_rank", type=int, default=0, help="plan LoRA runs of this rank (no EMA)")
    p.add_argument("--search", action="store_true", help="find the largest per-core batch")
    p.add_argument(
        "--search_limit",
        default="prior=512,decoder=64",
        help="per stage, or stage:feeding (decoder:step=0 skips that search)",
    )
    p.add_argument("--size", default="real", help="model_configs size (tiny: a quick check)")
    p.add_argument("--output_dir", type=user_path, default="plans")
    p.add_argument("--in_process", action="store_true", help="no process per compile (tiny)")

    def run(args):
        from flax_kandinsky.tpu_plan import PlanSpec
        from flax_kandinsky.tpu_plan_search import run_plans, write_results

        a = p.parse_args(args)
        batch, remat = per_stage(a.batch_per_core, int), per_stage(a.remat, REMAT.__getitem__)
        common = dict(mesh_shape=a.mesh_shape, resolution=a.resolution, precision=a.precision)
        use_ema = not a.no_ema and not a.lora_rank  # the LoRA scripts keep no EMA
        common.update(attention=a.attention, use_ema=use_ema, size=a.size)
        common.update(lora_rank=a.lora_rank)
        specs = [
            PlanSpec(
                stage,
                slice_,
                batch_per_core=batch[stage],
                feeding=feeding,
                remat=remat[stage],
                **common,
            )
            for slice_ in a.slices.split(",")
            for stage in a.stages.split(",")
            for feeding in a.feedings.split(",")
        ]
        limits = per_stage(a.search_limit, int) if a.search else {}
        out = Path(a.output_dir)
        plans = run_plans(specs, limits, memo_path=out / "compiles.jsonl", isolate=not a.in_process)
        print(write_results(plans, out))
        return 0

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
