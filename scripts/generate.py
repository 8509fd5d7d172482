#!/usr/bin/env python
"""Generate images from a Kandinsky 2.2 prior folder and decoder folder (diffusers layout).

python scripts/generate.py --prior PRIOR_DIR --decoder DECODER_DIR --prompt "a cat" --out DIR
"""

import argparse
import sys

from kandinsky_common.errors import UserError, run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", required=True, help="prior pipeline folder")
    p.add_argument("--decoder", required=True, help="decoder pipeline folder")
    p.add_argument("--prompt", nargs="+", required=True, help="one image per prompt")
    p.add_argument("--out", required=True, help="output folder for PNGs (and grid.png)")
    p.add_argument("--size", type=int, default=512, help="height and width in pixels")
    p.add_argument("--steps", type=int, default=50, help="decoder denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.error = lambda msg: (_ for _ in ()).throw(UserError(f"{msg} (see --help)"))
    a = p.parse_args(argv)
    from torch_kandinsky.generate import generate_images

    for path in generate_images(
        a.prior, a.decoder, a.prompt, size=a.size, steps=a.steps, seed=a.seed, out_dir=a.out
    ):
        print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
