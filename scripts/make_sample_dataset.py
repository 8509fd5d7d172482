"""Write a small imagefolder dataset of real photos with English captions.

    python scripts/make_sample_dataset.py --out /tmp/photos [--num_images 32] [--seed 0]

prints the folder. It holds JPEG/PNG images and metadata.jsonl (file_name, text), ready for
`--train_data_dir`. The photos are the ones scikit-image bundles (no download), cropped, flipped
and resized deterministically for the seed.
"""

from __future__ import annotations

import argparse
import sys

from kandinsky_common.errors import run_cli
from kandinsky_common.folders import user_path
from kandinsky_fixtures.sample_data import build_sample_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--out", type=user_path, required=True, help="new or empty folder to write the dataset to"
    )
    p.add_argument("--num_images", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and sizes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(build_sample_dataset(args.out, n=args.num_images, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
