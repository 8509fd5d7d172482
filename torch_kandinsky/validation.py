"""Validation images with diffusers' Kandinsky 2.2 pipelines built from the training components."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from kandinsky_common.images import save_grid
from kandinsky_common.run import validation_out_of_memory
from torch_kandinsky.sampling import Sampler, memory_failure


class Validator:
    """Renders the run's validation prompts with the network being trained (its EMA weights when
    the run keeps them) on the main process: a PNG grid and the trackers' image summaries.

    Parameters:
        cfg: the run's TrainConfig (prompts, resolution, validation steps, seed, output_dir).
        stage: the Stage being trained: its network is the one the given model replaces.
        accelerator: the run's Accelerator (device, main process, trackers).
    """

    def __init__(self, cfg, stage, accelerator):
        self.cfg, self.stage, self.accelerator = cfg, stage, accelerator
        self.out_of_memory = False  # validation stopped: its images did not fit

    def __call__(self, model, step: int, ema=None) -> Path | None:
        """Render with `model` (its `ema` weights when given). Images that do not fit in memory
        give one warning, and the run goes on without validation (None)."""
        acc, cfg = self.accelerator, self.cfg
        if not acc.is_main_process or self.out_of_memory:
            return None
        net = acc.unwrap_model(model)
        if ema is not None:
            ema.store(net.parameters())
            ema.copy_to(net.parameters())
        try:
            images = generate(
                self.stage,
                net,
                cfg.validation_prompts,
                size=cfg.resolution,
                steps=cfg.validation_steps,
                seed=cfg.seed,
                device=acc.device,
            )
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one too
            what = memory_failure(e)
            if what is None:
                raise
            self.out_of_memory = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the failed render's cached blocks, back to training
            # on a line of its own, under the progress bar
            tqdm.write(validation_out_of_memory(cfg, self.stage.spec.name, what), file=sys.stderr)
            return None
        finally:
            if ema is not None:
                ema.restore(net.parameters())
        path = log_images(acc, images, step, cfg.output_dir)
        acc.print(f"validation images: {path}")
        return path


def generate(stage, model, prompts, *, size, steps, seed, device) -> list[Image.Image]:
    """Validation images from the network being trained (put back in train mode after)."""
    was_training = model.training
    model.eval()
    prior_pipe, decoder_pipe = stage.validation_pipelines(model)
    # Under --mixed_precision the frozen parts are bf16/fp16 and the trained network fp32; the
    # pipelines pass tensors between them in one dtype (the decoder hands the UNet's fp32 latents
    # to the movq), so they run under autocast, as the training forward does.
    mixed = stage.weight_dtype != torch.float32
    try:
        with torch.autocast(device.type, dtype=stage.weight_dtype, enabled=mixed):
            sampler = Sampler(prior_pipe, decoder_pipe, device)
            return sampler.generate(
                prompts, height=size, width=size, decoder_steps=steps, seed=seed
            )
    finally:  # also when the images did not fit: training goes on in train mode
        model.train(was_training)


def log_images(accelerator, images: list[Image.Image], step: int, output_dir: str) -> Path:
    """PNG grid in output_dir/validation and, with tensorboard, an image summary."""
    path = save_grid(images, Path(output_dir) / "validation" / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            arr = np.stack([np.asarray(im) for im in images])
            tracker.writer.add_images("validation", arr, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im) for im in images]}, step=step)
    return path


def class_image_generator(cfg, device):
    """DreamBooth's class images: (prompts, seed) -> PIL images of the base model at
    --resolution, with diffusers' pipelines (--class_image_steps decoder steps)."""
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    sampler = Sampler.from_folders(
        cfg.pretrained_prior_model_name_or_path,
        cfg.pretrained_decoder_model_name_or_path,
        dtype,
        device=device,
    )

    def generate(prompts, seed):
        size = cfg.resolution
        steps = cfg.class_image_steps
        return sampler.generate(prompts, height=size, width=size, decoder_steps=steps, seed=seed)

    return generate
