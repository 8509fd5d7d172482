"""The one training step of the torch backend, shared by both stages."""

from __future__ import annotations

import numpy as np
import torch

from kandinsky_common.errors import UserError
from torch_kandinsky.diffusion import add_noise, diffusion_loss, get_target


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf; training stops, the last good checkpoint is kept."""


def stage_loss(stage, model, enc, noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma=None):
    """Loss of `model` on encoder outputs `enc` with the given noise and timesteps."""
    x0 = stage.x0(enc)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    timesteps = timesteps.to(x0.device)
    ac = stage.alphas_cumprod.to(x0.device)
    x_t = add_noise(x0, noise, timesteps, ac)
    pred = stage.predict(model, x_t, timesteps, enc)
    pt = stage.schedule.prediction_type
    target = get_target(pt, x0, noise, timesteps, ac)
    return diffusion_loss(pred, target, timesteps, ac, pt, snr_gamma)


def train_step(
    accelerator,
    stage,
    model,
    optimizer,
    batch: dict[str, np.ndarray],
    noise: np.ndarray,
    timesteps: np.ndarray,
    *,
    max_grad_norm: float,
    snr_gamma: float | None,
    encoded: bool = False,
) -> float:
    """One micro-step: encode (frozen; skipped when `batch` holds cached encoder outputs), loss,
    backward; on an update boundary clip and step."""
    with accelerator.accumulate(model):
        dev = stage.to_device(batch, accelerator.device, stage.weight_dtype)
        enc = dev if encoded else stage.encode(dev)
        loss = stage_loss(
            stage, model, enc, torch.from_numpy(noise), torch.from_numpy(timesteps), snr_gamma
        )
        value = loss.detach().float().item()
        if not np.isfinite(value):
            raise NonFiniteLoss(
                f"the loss became {value} at optimizer update {optimizer_update(accelerator)}; "
                "lower --learning_rate or use --mixed_precision bf16 instead of fp16, and resume "
                "from the last checkpoint"
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            params = [p for p in model.parameters() if p.requires_grad]
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return value


def optimizer_update(accelerator) -> int:
    return accelerator.step // max(accelerator.gradient_accumulation_steps, 1)
