"""Kandinsky 2.2 text-to-image sampling in JAX: diffusers' prior and decoder pipelines, jitted.

sampler = Sampler.from_folders(prior_dir, decoder_dir)
images = sampler.generate(["a red cat"], height=512, width=512, decoder_steps=50, seed=0)
"""

from flax_kandinsky.sampling.pipelines import (
    DecoderPipeline,
    PriorPipeline,
    downscale_height_and_width,
    to_pil,
)
from flax_kandinsky.sampling.sampler import Sampler, memory_failure
from flax_kandinsky.sampling.schedulers import DDPMScheduler, UnCLIPScheduler, load_scheduler
from flax_kandinsky.xla_flags import use_cpu_low_memory_schedule

__all__ = [
    "DDPMScheduler",
    "DecoderPipeline",
    "PriorPipeline",
    "Sampler",
    "UnCLIPScheduler",
    "downscale_height_and_width",
    "load_scheduler",
    "memory_failure",
    "to_pil",
    "use_cpu_low_memory_schedule",
]
