#!/usr/bin/env python
"""Export a training checkpoint as a diffusers pipeline folder (prior or decoder).

python scripts/export_checkpoint.py --checkpoint OUT/checkpoint-500 --output OUT-500
"""

import argparse
import sys

from kandinsky_common.checkpoints import read_state
from kandinsky_common.errors import UserError, run_cli
from kandinsky_common.folders import user_path
from kandinsky_common.preemption import sigint_deferred
from kandinsky_common.storage import is_url


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint",
        type=user_path,
        required=True,
        help="a checkpoint-N folder of either backend",
    )
    p.add_argument("--output", type=user_path, required=True, help="new folder for the pipeline")
    p.add_argument("--no_ema", action="store_true", help="export the live weights, not the EMA")
    p.error = lambda msg: (_ for _ in ()).throw(UserError(f"{msg} (see --help)"))
    a = p.parse_args(argv)
    backend = read_state(a.checkpoint).get("backend")
    if backend != "flax" and is_url(a.output):
        raise UserError(
            f"--output {a.output}: a torch checkpoint exports to a local folder; pass one (and "
            "copy it to the bucket afterwards)"
        )
    with sigint_deferred():  # jaxlib's initialisation crashes (SIGSEGV) when interrupted
        if backend == "flax":
            from flax_kandinsky.export import export_checkpoint
        else:
            from torch_kandinsky.export import export_checkpoint
    print(export_checkpoint(a.checkpoint, a.output, use_ema=not a.no_ema))


if __name__ == "__main__":
    sys.exit(run_cli(main))
