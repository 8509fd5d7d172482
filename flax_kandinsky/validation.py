"""Validation images during flax training: the JAX pipelines with the weights being trained."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
from tqdm.auto import tqdm

from flax_kandinsky.sampling import Sampler, memory_failure
from kandinsky_common.images import save_grid
from kandinsky_common.run import validation_out_of_memory
from kandinsky_common.storage import location


class Validator:
    """Builds the sampler once (first use) and renders `prompts` with the current weights.

    Parameters:
        cfg: the run's TrainConfig (prompts, resolution, validation steps, seed, folders).
        stage: the Stage being trained: its network is the one the given params replace.
    """

    def __init__(self, cfg, stage):
        self.cfg, self.stage, self.params_key = cfg, stage, stage.params_key
        self._sampler = None
        self.out_of_memory = False  # validation stopped: its images did not fit

    def __call__(self, params, step: int, tracker=None) -> Path | None:
        """Render with `params`. Images that do not fit in memory give one warning, and the run
        goes on without validation (None)."""
        cfg = self.cfg
        if self.out_of_memory:
            return None
        if self._sampler is None:
            dtype = jnp.bfloat16 if cfg.mixed_precision == "bf16" else None
            self._sampler = Sampler.from_folders(
                cfg.pretrained_prior_model_name_or_path,
                cfg.pretrained_decoder_model_name_or_path,
                dtype=dtype,
            )
        override = {self.params_key: self.stage.sampling_params(params)}
        try:
            images = self._sampler.generate(
                cfg.validation_prompts,
                height=cfg.resolution,
                width=cfg.resolution,
                decoder_steps=cfg.validation_steps,
                seed=cfg.seed or 0,
                **override,
            )
        except Exception as e:
            what = memory_failure(e)
            if what is None:
                raise
            self.out_of_memory, self._sampler = True, None  # the sampler's memory goes back
            # on a line of its own, under the progress bar
            tqdm.write(validation_out_of_memory(cfg, self.stage.spec.name, what), file=sys.stderr)
            return None
        path = save_grid(images, location(cfg.output_dir) / "validation" / f"step-{step:06d}.png")
        if tracker is not None:
            tracker.images("validation", images, step)
        print(f"validation images: {path}")
        return path


def class_image_generator(cfg):
    """DreamBooth's class images: (prompts, seed) -> PIL images of the base model at
    --resolution, with the JAX pipelines (--class_image_steps decoder steps)."""
    dtype = jnp.bfloat16 if cfg.mixed_precision == "bf16" else None
    sampler = Sampler.from_folders(
        cfg.pretrained_prior_model_name_or_path,
        cfg.pretrained_decoder_model_name_or_path,
        dtype=dtype,
    )

    def generate(prompts, seed):
        size = cfg.resolution
        steps = cfg.class_image_steps
        return sampler.generate(prompts, height=size, width=size, decoder_steps=steps, seed=seed)

    return generate
