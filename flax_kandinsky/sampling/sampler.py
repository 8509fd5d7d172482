"""The combined text-to-image sampler (prior pipeline, then decoder pipeline), and how to tell a
failed allocation from other sampling errors."""

from __future__ import annotations

import re
from pathlib import Path

import jax
from jax.sharding import Mesh
from PIL import Image

from flax_kandinsky.sampling.pipelines import DecoderPipeline, PriorPipeline
from flax_kandinsky.sampling.schedulers import prng_key


def memory_failure(e: BaseException) -> str | None:
    """What ran out, with XLA's detail, when `e` reports an allocation that failed; else None.

    XLA raises RESOURCE_EXHAUSTED when its own buffers do not fit; XLA:CPU's YNNPACK kernels
    allocate their own and report a failed allocation only as "YNNPACK operation failed: error"
    (after an "allocate of <N> failed" line of their own on stderr).
    """
    if isinstance(e, MemoryError):
        return "host memory (RAM)"
    if not isinstance(e, jax.errors.JaxRuntimeError):
        return None
    text = str(e)
    platform = jax.default_backend()
    where = "host memory (RAM)" if platform == "cpu" else f"{platform} device memory"
    if "RESOURCE_EXHAUSTED" in text:
        asked = re.search(r"allocating (\d+) bytes", text)
        if asked:
            return f"{where} (XLA asked for {int(asked.group(1)) / 1e9:.1f} GB)"
        return f"{where} ({text.splitlines()[0][:200]})"
    if platform == "cpu" and "YNNPACK operation failed: error" in text:
        return f"{where} (an XLA:CPU YNNPACK kernel could not allocate its buffers)"
    return None


class Sampler:
    """Text -> images with a prior pipeline and a decoder pipeline (diffusers' combined K2.2
    text-to-image: prior 25 steps and guidance 4, decoder guidance 4).

    Parameters:
        prior: a PriorPipeline; decoder: a DecoderPipeline.
    """

    def __init__(self, prior: PriorPipeline, decoder: DecoderPipeline):
        self.prior = prior
        self.decoder = decoder

    @classmethod
    def from_folders(
        cls,
        prior_dir: str | Path,
        decoder_dir: str | Path,
        dtype=None,
        *,
        mesh: Mesh | None = None,
        prior_params=None,
        unet_params=None,
        attention: str = "chunked",
    ) -> Sampler:
        """Both pipelines from diffusers folders. `dtype`: compute dtype (None = fp32, or
        jnp.bfloat16); prior_params / unet_params (the nnx.Param state that
        `nnx.split(model, nnx.Param, ...)` gives, or its pure dict) replace the loaded networks'
        weights; `attention`: the decoder pipeline's kernel (see DecoderPipeline)."""
        prior = PriorPipeline.from_folder(prior_dir, dtype=dtype, mesh=mesh)
        decoder = DecoderPipeline.from_folder(
            decoder_dir, dtype=dtype, mesh=mesh, attention=attention
        )
        prior.params = prior.place.override(prior.params, prior_params, "prior")
        decoder.params = decoder.place.override(decoder.params, unet_params, "unet")
        return cls(prior, decoder)

    def generate(
        self,
        prompts,
        *,
        height: int = 512,
        width: int = 512,
        prior_steps: int = 25,
        decoder_steps: int = 100,
        guidance_scale: float = 4.0,
        prior_guidance_scale: float = 4.0,
        negative_prompt=None,
        seed=0,
        prior_params=None,
        unet_params=None,
    ) -> list[Image.Image]:
        """One image per prompt. `seed` (int or PRNG key) is split between the two stages;
        prior_params / unet_params override the weights for this call only."""
        prior_key, decoder_key = jax.random.split(prng_key(seed))
        embeds, negative = self.prior(
            prompts,
            negative_prompt,
            num_inference_steps=prior_steps,
            guidance_scale=prior_guidance_scale,
            seed=prior_key,
            params=prior_params,
        )
        return self.decoder(
            embeds,
            negative,
            height=height,
            width=width,
            num_inference_steps=decoder_steps,
            guidance_scale=guidance_scale,
            seed=decoder_key,
            params=unet_params,
        )
