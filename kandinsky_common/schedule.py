"""DDPM noise schedules in numpy, equal to diffusers' DDPMScheduler / UnCLIPScheduler buffers.

The prior builds its schedule in code (`squaredcos_cap_v2`, 1000 steps, prediction "sample"); the
decoder reads its folder's scheduler config (linear 0.00085 -> 0.012, prediction "epsilon").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kandinsky_common.errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal, computed in float64 then cast, as diffusers does."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float32)


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> np.ndarray:
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        return (
            np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
        )
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise UserError(
        f"scheduler beta_schedule {beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}"
    )


def betas_from_config(config: Mapping) -> np.ndarray:
    """The training betas a diffusers scheduler_config.json describes (diffusers' defaults for
    absent keys): its trained_betas, or its beta_schedule over num_train_timesteps."""
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    return make_betas(
        config.get("beta_schedule", "linear"),
        int(config.get("num_train_timesteps", 1000)),
        float(config.get("beta_start", 0.0001)),
        float(config.get("beta_end", 0.02)),
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """Training-time view of a DDPM schedule: what add_noise, targets and Min-SNR need."""

    betas: np.ndarray
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        # torch.cumprod over float32 accumulates in double on the CPU: match it bit for bit.
        return np.cumprod((1.0 - self.betas).astype(np.float64)).astype(np.float32)

    def snr(self, timesteps: np.ndarray) -> np.ndarray:
        """SNR_t = (sqrt(a_t) / sqrt(1 - a_t))^2, in float32 as diffusers' compute_snr."""
        ac = self.alphas_cumprod
        alpha = np.sqrt(ac)[timesteps].astype(np.float32)
        sigma = np.sqrt(1.0 - ac)[timesteps].astype(np.float32)
        return (alpha / sigma) ** 2

    @classmethod
    def from_config(cls, config: dict, prediction_type: str | None = None) -> NoiseSchedule:
        """Build from a diffusers scheduler_config.json dict (DDPM/DDIM/UnCLIP keys)."""
        betas = betas_from_config(config)
        pred = prediction_type or config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise UserError(f"prediction_type {pred!r} is not one of {PREDICTION_TYPES}")
        return cls(betas=betas, prediction_type=pred)

    @classmethod
    def for_training(cls, config: dict, prediction_type: str | None = None) -> NoiseSchedule:
        """A decoder's schedule from its scheduler config, as training needs it: the decoder
        learns noise (epsilon or v); a config that predicts 'sample' needs the flag."""
        schedule = cls.from_config(config, prediction_type=prediction_type)
        if schedule.prediction_type == "sample":
            raise UserError(
                "the decoder scheduler predicts 'sample'; pass --prediction_type epsilon"
            )
        return schedule

    @classmethod
    def prior(cls) -> NoiseSchedule:
        """The prior script's DDPMScheduler("squaredcos_cap_v2", prediction_type="sample")."""
        return cls(betas=betas_for_alpha_bar(1000), prediction_type="sample")
