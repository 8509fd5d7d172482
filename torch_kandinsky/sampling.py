"""Kandinsky 2.2 text-to-image with diffusers' prior and decoder pipelines (torch).

Mirrors flax_kandinsky.sampling:

sampler = Sampler.from_folders(prior_dir, decoder_dir)
images = sampler.generate(["a red cat"], height=512, width=512, decoder_steps=50, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
from PIL import Image
from transformers import CLIPImageProcessorPil


def image_processor(prior_folder) -> CLIPImageProcessorPil:
    # The PIL processor: transformers' default one needs torchvision, which we do not install.
    return CLIPImageProcessorPil.from_pretrained(prior_folder, subfolder="image_processor")


def memory_failure(e: BaseException) -> str | None:
    """What ran out when `e` is a failed allocation (CUDA or the CPU allocator), else None."""
    if isinstance(e, torch.OutOfMemoryError):
        return "GPU memory"
    if isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "DefaultCPUAllocator" in str(e)
    ):
        return "host memory (RAM)"
    return None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Sampler:
    """Text -> images with a prior pipeline and a decoder pipeline (diffusers' combined K2.2
    text-to-image: prior 25 steps and guidance 4, decoder guidance 4).

    Parameters:
        prior: a KandinskyV22PriorPipeline; decoder: a KandinskyV22Pipeline.
        device: where both run (moved there on construction).
    """

    def __init__(self, prior, decoder, device: torch.device):
        self.prior, self.decoder, self.device = prior, decoder, device
        for pipe in (prior, decoder):
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_folders(
        cls,
        prior_dir: str | Path,
        decoder_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | None = None,
    ) -> Sampler:
        """Both pipelines from diffusers folders, every part in `dtype` whatever the folders hold
        (a folder with parts in several dtypes, or a half-precision variant, runs as well);
        `device`: the GPU when there is one, else the CPU."""
        prior = KandinskyV22PriorPipeline.from_pretrained(
            prior_dir, image_processor=image_processor(prior_dir), dtype=dtype
        )
        decoder = KandinskyV22Pipeline.from_pretrained(decoder_dir, dtype=dtype)
        return cls(prior, decoder, device or default_device())

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        height: int = 512,
        width: int = 512,
        prior_steps: int = 25,
        decoder_steps: int = 100,
        guidance_scale: float = 4.0,
        prior_guidance_scale: float = 4.0,
        seed: int | None = 0,
    ) -> list[Image.Image]:
        """One image per prompt, the prompts one after the other from one generator seeded with
        `seed` (None: unseeded)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        images = []
        for prompt in prompts:
            embeds, negative = self.prior(
                prompt,
                num_inference_steps=prior_steps,
                guidance_scale=prior_guidance_scale,
                generator=generator,
            ).to_tuple()
            out = self.decoder(
                image_embeds=embeds,
                negative_image_embeds=negative,
                height=height,
                width=width,
                num_inference_steps=decoder_steps,
                guidance_scale=guidance_scale,
                generator=generator,
            )
            images.append(out.images[0])
        return images
