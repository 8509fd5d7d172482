"""Text-to-image from a prior folder and a decoder folder with diffusers' pipelines (torch)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

from kandinsky_common.folders import check_pipeline_folder
from kandinsky_common.images import save_grid
from torch_kandinsky.export import image_processor
from torch_kandinsky.validation import run_pipelines


def generate_images(
    prior: str, decoder: str, prompts: list[str], *, size: int, steps: int, seed: int, out_dir: str
) -> list[Path]:
    prior_dir = check_pipeline_folder(prior, "prior", "--prior")
    decoder_dir = check_pipeline_folder(decoder, "decoder", "--decoder")
    # float32 whatever the folders hold: the pipelines run on the CPU, and a folder with parts in
    # several dtypes (exported by an older bf16 run, or a half-precision variant) runs as well.
    prior_pipe = KandinskyV22PriorPipeline.from_pretrained(
        prior_dir, image_processor=image_processor(prior_dir), dtype=torch.float32
    )
    decoder_pipe = KandinskyV22Pipeline.from_pretrained(decoder_dir, dtype=torch.float32)
    images = run_pipelines(
        prior_pipe,
        decoder_pipe,
        prompts,
        size=size,
        steps=steps,
        seed=seed,
        device=torch.device("cpu"),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{i:03d}.png")
        im.save(paths[-1])
    if len(images) > 1:
        paths.append(save_grid(images, out / "grid.png"))
    return paths
