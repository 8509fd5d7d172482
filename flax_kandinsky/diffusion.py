"""Forward diffusion, targets and Min-SNR weights in jnp (mirrors torch_kandinsky/diffusion.py).

Min-SNR here covers sample, epsilon and v_prediction; the diffusers docs call Min-SNR
PyTorch-only, and its Flax script had none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _gather(values: jax.Array, timesteps: jax.Array, ndim: int) -> jax.Array:
    out = values[timesteps]
    return out.reshape(out.shape + (1,) * (ndim - 1))  # (B,) -> (B, 1, ...) for broadcasting


def add_noise(x0, noise, timesteps, alphas_cumprod):
    """sqrt(a_t) x0 + sqrt(1 - a_t) noise; a_t cast to x0's dtype first, as diffusers does."""
    ac = alphas_cumprod.astype(x0.dtype)
    return (
        _gather(ac**0.5, timesteps, x0.ndim) * x0
        + _gather((1 - ac) ** 0.5, timesteps, x0.ndim) * noise
    )


def get_target(prediction_type: str, x0, noise, timesteps, alphas_cumprod):
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return noise
    ac = alphas_cumprod.astype(x0.dtype)  # v = sqrt(a) eps - sqrt(1 - a) x0
    return (
        _gather(ac**0.5, timesteps, x0.ndim) * noise
        - _gather((1 - ac) ** 0.5, timesteps, x0.ndim) * x0
    )


def compute_snr(alphas_cumprod, timesteps):
    alpha = (alphas_cumprod**0.5)[timesteps].astype(jnp.float32)
    sigma = ((1.0 - alphas_cumprod) ** 0.5)[timesteps].astype(jnp.float32)
    return (alpha / sigma) ** 2


def min_snr_weights(snr, gamma: float, prediction_type: str):
    w = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return w / snr
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    return w  # "sample": min(SNR, gamma), as the prior script


def diffusion_loss(
    pred, target, timesteps, alphas_cumprod, prediction_type, snr_gamma=None, weights=None
):
    """MSE in fp32, optionally Min-SNR weighted per sample (mean over non-batch dims first) and
    times per-sample `weights` (DreamBooth's instance and class halves)."""
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    if snr_gamma is None and weights is None:
        return jnp.mean(err)
    per = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    if snr_gamma is not None:
        per = per * min_snr_weights(
            compute_snr(alphas_cumprod, timesteps), snr_gamma, prediction_type
        )
    if weights is not None:
        per = per * weights.astype(jnp.float32)
    return jnp.mean(per)
