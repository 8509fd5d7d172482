"""Forward diffusion, targets and Min-SNR weights in torch (mirrors flax_kandinsky/diffusion.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values[timesteps]
    return out.reshape(out.shape + (1,) * (ndim - 1))  # (B,) -> (B, 1, ...) for broadcasting


def add_noise(x0, noise, timesteps, alphas_cumprod):
    """sqrt(a_t) x0 + sqrt(1 - a_t) noise; a_t cast to x0's dtype first, as diffusers does."""
    ac = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    return (
        _gather(ac**0.5, timesteps, x0.ndim) * x0
        + _gather((1 - ac) ** 0.5, timesteps, x0.ndim) * noise
    )


def get_target(prediction_type: str, x0, noise, timesteps, alphas_cumprod):
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return noise
    ac = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)  # v = sqrt(a) eps - sqrt(1-a) x0
    return (
        _gather(ac**0.5, timesteps, x0.ndim) * noise
        - _gather((1 - ac) ** 0.5, timesteps, x0.ndim) * x0
    )


def compute_snr(alphas_cumprod, timesteps):
    """diffusers.training_utils.compute_snr."""
    ac = alphas_cumprod.to(timesteps.device)
    alpha = (ac**0.5)[timesteps].float()
    sigma = ((1.0 - ac) ** 0.5)[timesteps].float()
    return (alpha / sigma) ** 2


def min_snr_weights(snr, gamma: float, prediction_type: str):
    w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return w / snr
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    return w  # "sample": min(SNR, gamma), as the prior script


def diffusion_loss(
    pred, target, timesteps, alphas_cumprod, prediction_type, snr_gamma=None, weights=None
):
    """MSE on fp32, optionally Min-SNR weighted per sample (mean over non-batch dims first) and
    times per-sample `weights` (DreamBooth's instance and class halves)."""
    if snr_gamma is None and weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per = F.mse_loss(pred.float(), target.float(), reduction="none")
    per = per.mean(dim=list(range(1, per.ndim)))
    if snr_gamma is not None:
        per = per * min_snr_weights(
            compute_snr(alphas_cumprod, timesteps), snr_gamma, prediction_type
        )
    if weights is not None:
        per = per * weights.to(per.device, torch.float32)
    return per.mean()
