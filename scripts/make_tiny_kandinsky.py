"""Write randomly initialised Kandinsky 2.2 prior and decoder folders (diffusers layout).

    python scripts/make_tiny_kandinsky.py --out /tmp/k22 [--size tiny|small] [--seed 0]

prints the prior and the decoder folder, one per line. The decoder's README names the prior, so
`AutoPipelineForText2Image.from_pretrained(<decoder>)` builds the combined pipeline offline.
"""

from __future__ import annotations

import argparse
import sys

from kandinsky_common.errors import run_cli
from kandinsky_common.folders import user_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--out", type=user_path, required=True, help="folder to create prior/ and decoder/ in"
    )
    p.add_argument("--size", choices=("tiny", "small"), default="tiny", help="model configs")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the random weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help and flag errors do not wait for torch and diffusers.
    from kandinsky_fixtures.kandinsky_folders import build_kandinsky_folders

    prior_dir, decoder_dir = build_kandinsky_folders(args.out, size=args.size, seed=args.seed)
    print(prior_dir)
    print(decoder_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
