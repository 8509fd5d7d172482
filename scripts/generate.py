#!/usr/bin/env python
"""Generate images from a Kandinsky 2.2 prior folder and decoder folder (diffusers layout).

python scripts/generate.py --prior PRIOR_DIR --decoder DECODER_DIR --prompt "a cat" --out DIR
(--backend flax, the default, samples with JAX; --backend torch with diffusers' pipelines.)
Prior 25 steps and guidance 4, decoder guidance 4, as diffusers' combined pipeline.
"""

import argparse
import sys
from pathlib import Path

from kandinsky_common.errors import UserError, run_cli


def flax_images(a) -> list:
    from kandinsky_common.folders import check_pipeline_folder

    prior = check_pipeline_folder(a.prior, "prior", "--prior")
    decoder = check_pipeline_folder(a.decoder, "decoder", "--decoder")
    from flax_kandinsky.sampling import Sampler, checkpoint_params

    trained = {}
    if a.checkpoint is not None:  # the trained network replaces its twin from --prior/--decoder
        stage, params = checkpoint_params(a.checkpoint)
        trained = {"prior_params" if stage == "prior" else "unet_params": params}
    sampler = Sampler.from_folders(prior, decoder, **trained)
    return sampler.generate(
        a.prompt, height=a.size, width=a.size, decoder_steps=a.steps, seed=a.seed
    )


def save(images, out_dir: str) -> list[Path]:
    from kandinsky_common.images import save_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{i:03d}.png")
        im.save(paths[-1])
    if len(images) > 1:
        paths.append(save_grid(images, out / "grid.png"))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("flax", "torch"), default="flax", help="default: flax")
    p.add_argument("--prior", required=True, help="prior pipeline folder")
    p.add_argument("--decoder", required=True, help="decoder pipeline folder")
    p.add_argument(
        "--checkpoint",
        help="flax training checkpoint (checkpoint-N): its network (EMA weights if kept)\n"
        "replaces the prior or the UNet of --prior/--decoder",
    )
    p.add_argument("--prompt", nargs="+", required=True, help="one image per prompt")
    p.add_argument("--out", required=True, help="output folder for PNGs (and grid.png)")
    p.add_argument("--size", type=int, default=512, help="height and width in pixels")
    p.add_argument("--steps", type=int, default=50, help="decoder denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.error = lambda msg: (_ for _ in ()).throw(UserError(f"{msg} (see --help)"))
    a = p.parse_args(argv)
    if a.size < 1 or a.steps < 1:
        raise UserError(f"--size {a.size} and --steps {a.steps} must be positive")
    if a.backend == "torch":
        if a.checkpoint is not None:
            raise UserError(
                "--checkpoint samples a flax checkpoint; for a torch run, export it with "
                "scripts/export_checkpoint.py and pass the folder as --prior or --decoder"
            )
        from torch_kandinsky.generate import generate_images

        paths = generate_images(
            a.prior, a.decoder, a.prompt, size=a.size, steps=a.steps, seed=a.seed, out_dir=a.out
        )
    else:
        paths = save(flax_images(a), a.out)
    for path in paths:
        print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
