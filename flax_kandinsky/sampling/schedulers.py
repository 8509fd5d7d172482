"""diffusers' UnCLIPScheduler (prior) and DDPMScheduler (decoder) as step tables plus a jnp step.

diffusers recomputes a step's coefficients from Python ints and 0-d float32 tensors at every call.
Here `table(num_inference_steps)` does that arithmetic once, in numpy float32 with diffusers'
operation order (sqrt where torch computes `** 0.5`), and returns one row per inference step; the
jitted sampling loop indexes the table and calls `step`, which does the tensor half of
`scheduler.step`. The noise of a step is an argument: the loop draws it (or takes injected noise
for parity tests). Steps whose timestep is 0 add no noise, as in diffusers, so their noise row is
ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kandinsky_common.errors import UserError
from kandinsky_common.folders import read_config
from kandinsky_common.schedule import (
    PREDICTION_TYPES,
    NoiseSchedule,
    betas_for_alpha_bar,
    betas_from_config,
)

Table = dict[str, np.ndarray]  # name -> (num_steps,) array; rows are inference steps

_ONE = np.float32(1.0)


def _f32(x) -> np.float32:
    return np.float32(x)


def _check_steps(num_inference_steps: int, least: int, what: str) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(
        num_inference_steps, int | np.integer
    ):
        raise UserError(f"{what} steps must be an integer, got {num_inference_steps!r}")
    if num_inference_steps < least:
        raise UserError(f"{what} needs at least {least} inference steps, got {num_inference_steps}")
    return int(num_inference_steps)


def _stack(rows: list[dict]) -> Table:
    out = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    out["timestep"] = out["timestep"].astype(np.int32)
    return {k: (v if k == "timestep" else v.astype(np.float32)) for k, v in out.items()}


def _prediction_to_x0(prediction_type: str, row, model_output, sample):
    if prediction_type == "epsilon":
        return (sample - row["sqrt_beta_prod"] * model_output) / row["sqrt_alpha_prod"]
    if prediction_type == "v_prediction":
        return row["sqrt_alpha_prod"] * sample - row["sqrt_beta_prod"] * model_output
    return model_output  # "sample"


@dataclass(frozen=True, eq=False)
class UnCLIPScheduler:
    """The prior's scheduler: diffusers' UnCLIPScheduler as the prior pipeline drives it.

    The pipeline passes the next table entry as `prev_timestep` and None (i.e. t - 1) at the last
    step, so beta is recomputed from the skipped span (`1 - a_t / a_prev`) except where the span is
    a single step. Variance "fixed_small_log": std = exp(0.5 * log(max(var, 1e-20))).

    Parameters:
        num_train_timesteps: length of the cosine ("squaredcos_cap_v2") schedule.
        clip_sample: clamp the predicted x0 to +-clip_sample_range.
        clip_sample_range: the clamp bound (10.0 for the K2.2 prior).
        prediction_type: "sample" (K2.2) or "epsilon".
    """

    num_train_timesteps: int = 1000
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: Mapping) -> UnCLIPScheduler:
        """From an UnCLIPScheduler scheduler_config.json (diffusers' defaults for absent keys)."""
        if config.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
            raise UserError("UnCLIPScheduler only supports beta_schedule 'squaredcos_cap_v2'")
        variance = config.get("variance_type", "fixed_small_log")
        if variance != "fixed_small_log":
            # learned_range needs a variance output the PriorTransformer does not have.
            raise UserError(
                f"UnCLIPScheduler variance_type {variance!r} is not supported for the prior; "
                "use 'fixed_small_log' (the K2.2 prior's)"
            )
        pred = config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "sample"):
            raise UserError(f"UnCLIPScheduler prediction_type {pred!r}: use 'sample' or 'epsilon'")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            clip_sample=bool(config.get("clip_sample", True)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            prediction_type=pred,
        )

    @property
    def betas(self) -> np.ndarray:
        return betas_for_alpha_bar(self.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return NoiseSchedule(self.betas, self.prediction_type).alphas_cumprod

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """diffusers' `set_timesteps`: round(arange(n) * (T - 1) / (n - 1)), descending."""
        n = _check_steps(num_inference_steps, 2, "the prior (UnCLIPScheduler)")
        step_ratio = (self.num_train_timesteps - 1) / (n - 1)
        return (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)

    def table(self, num_inference_steps: int) -> Table:
        """Per-step coefficients for `step` (timestep, x0/sample coefficients, noise std)."""
        ts = self.timesteps(num_inference_steps)
        betas = self.betas
        alphas = (_ONE - betas).astype(np.float32)
        ac = self.alphas_cumprod
        rows = []
        for i, t in enumerate(ts):
            t = int(t)
            prev = int(ts[i + 1]) if i + 1 < len(ts) else t - 1
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else _ONE
            b_t, b_prev = _ONE - a_t, _ONE - a_prev
            if prev == t - 1:
                beta, alpha = betas[t], alphas[t]
            else:
                beta = _ONE - a_t / a_prev
                alpha = _ONE - beta
            std = _f32(0.0)
            if t > 0:
                var = _f32(b_prev / b_t * beta)
                std = np.exp(_f32(0.5) * np.log(np.maximum(var, _f32(1e-20))))
            rows.append(
                {
                    "timestep": t,
                    "x0_coef": np.sqrt(a_prev) * beta / b_t,
                    "sample_coef": np.sqrt(alpha) * b_prev / b_t,
                    "std": std,
                    "sqrt_alpha_prod": np.sqrt(a_t),
                    "sqrt_beta_prod": np.sqrt(b_t),
                }
            )
        return _stack(rows)

    def step(self, row, model_output: jax.Array, sample: jax.Array, noise: jax.Array) -> jax.Array:
        """x_{t_prev} from the model output at row["timestep"]; fp32 in, fp32 out."""
        x0 = _prediction_to_x0(self.prediction_type, row, model_output, sample)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = row["x0_coef"] * x0 + row["sample_coef"] * sample
        return prev + row["std"] * noise


_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True, eq=False)
class DDPMScheduler:
    """The decoder's scheduler: diffusers' DDPMScheduler with `set_timesteps(n)`.

    With a step count set, diffusers' `previous_timestep(t)` is the next entry of the timestep table
    (-1 after the last one, where a_prev = 1), so every step spans the gap to the next timestep.

    Parameters:
        betas: the training betas (float32, e.g. linear 0.00085 -> 0.012 for K2.2).
        prediction_type: "epsilon" (K2.2), "sample" or "v_prediction".
        variance_type: "fixed_small" (K2.2), "fixed_small_log", "fixed_large", "learned" or
            "learned_range" (the last two read the UNet's second half of channels).
        clip_sample, clip_sample_range: clamp the predicted x0 to +-clip_sample_range.
        timestep_spacing: "leading" (K2.2, plus steps_offset), "trailing" or "linspace".
        steps_offset: added to "leading" timesteps (1 for K2.2).
    """

    betas: np.ndarray
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def from_config(cls, config: Mapping) -> DDPMScheduler:
        """From a DDPMScheduler scheduler_config.json dict (diffusers' defaults for absent keys)."""
        unsupported = {
            "thresholding": "dynamic thresholding",
            "rescale_betas_zero_snr": "zero-terminal-SNR rescaling",
        }
        for key, what in unsupported.items():
            if config.get(key):
                raise UserError(f"decoder scheduler: {key}=true ({what}) is not supported")
        variance = config.get("variance_type", "fixed_small")
        if variance not in _DDPM_VARIANCES:
            raise UserError(
                f"decoder scheduler variance_type {variance!r} is not supported; "
                f"use one of {_DDPM_VARIANCES}"
            )
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in _SPACINGS:
            raise UserError(
                f"decoder scheduler timestep_spacing {spacing!r}: use one of {_SPACINGS}"
            )
        pred = config.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise UserError(
                f"decoder scheduler prediction_type {pred!r}: use one of {PREDICTION_TYPES}"
            )
        return cls(
            betas=betas_from_config(config),
            prediction_type=pred,
            variance_type=variance,
            clip_sample=bool(config.get("clip_sample", True)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return NoiseSchedule(self.betas, self.prediction_type).alphas_cumprod

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in ("learned", "learned_range")

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """diffusers' `set_timesteps(n)` for the configured timestep_spacing."""
        n = _check_steps(num_inference_steps, 1, "the decoder (DDPMScheduler)")
        T = self.num_train_timesteps
        if n > T:
            raise UserError(f"decoder steps {n} exceed the scheduler's {T} training timesteps")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = T // n
            ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            ts += self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        if ts.max() >= T or ts.min() < 0:
            raise UserError(
                f"decoder scheduler: {n} steps with steps_offset {self.steps_offset} give timestep "
                f"{int(ts.max())}, outside 0..{T - 1}; use fewer steps"
            )
        return ts

    def table(self, num_inference_steps: int) -> Table:
        """Per-step coefficients for `step`; one row per entry of `timesteps(n)`."""
        ts = self.timesteps(num_inference_steps)
        ac = self.alphas_cumprod
        rows = []
        for t in ts:
            t = int(t)
            # previous_timestep(): the entry after the first occurrence of t, or -1.
            index = int(np.nonzero(ts == t)[0][0])
            prev = int(ts[index + 1]) if index + 1 < len(ts) else -1
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else _ONE
            b_t, b_prev = _ONE - a_t, _ONE - a_prev
            cur_alpha = a_t / a_prev
            cur_beta = _ONE - cur_alpha
            var = np.maximum(b_prev / b_t * cur_beta, _f32(1e-20))
            if self.variance_type == "fixed_small":
                std = np.sqrt(var)
            elif self.variance_type == "fixed_small_log":
                std = np.exp(_f32(0.5) * np.log(var))
            elif self.variance_type == "fixed_large":
                std = np.sqrt(cur_beta)
            else:  # learned variances: the std comes from the model output
                std = _ONE
            rows.append(
                {
                    "timestep": t,
                    "x0_coef": np.sqrt(a_prev) * cur_beta / b_t,
                    "sample_coef": np.sqrt(cur_alpha) * b_prev / b_t,
                    "std": std if t > 0 else _f32(0.0),
                    "sqrt_alpha_prod": np.sqrt(a_t),
                    "sqrt_beta_prod": np.sqrt(b_t),
                    "min_log": np.log(var),
                    "max_log": np.log(cur_beta),
                }
            )
        return _stack(rows)

    def step(
        self,
        row,
        model_output: jax.Array,
        sample: jax.Array,
        noise: jax.Array,
        predicted_variance: jax.Array | None = None,
    ) -> jax.Array:
        """x_{t_prev}; `predicted_variance` (the UNet's second half) only for learned variances."""
        x0 = _prediction_to_x0(self.prediction_type, row, model_output, sample)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = row["x0_coef"] * x0 + row["sample_coef"] * sample
        std = row["std"]
        if self.variance_type == "learned":
            std = std * predicted_variance**0.5
        elif self.variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            std = std * jnp.exp(0.5 * (frac * row["max_log"] + (1 - frac) * row["min_log"]))
        return prev + std * noise


# --- noise draws: each row (prompt) has its own key; draw i of a row uses fold_in(key_r, i) ---


def prng_key(seed) -> jax.Array:
    """A PRNG key from an int seed, a key (kept), or None (a fresh random seed)."""
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    if isinstance(seed, int | np.integer):
        return jax.random.PRNGKey(int(seed))
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)  # raw uint32 keys convert to numpy for placement
    return seed


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """Row r's key: fold_in(key, r)."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))


def draw_normal(keys: jax.Array, index, shape) -> jax.Array:
    """One standard normal array per row key, (rows, *shape), float32."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape))(keys)


def load_scheduler(folder) -> UnCLIPScheduler | DDPMScheduler:
    """The scheduler of a pipeline's `scheduler/` folder (UnCLIPScheduler or DDPMScheduler)."""
    config = read_config(folder)
    name = config.get("_class_name")
    if name == "UnCLIPScheduler":
        return UnCLIPScheduler.from_config(config)
    if name == "DDPMScheduler":
        return DDPMScheduler.from_config(config)
    raise UserError(
        f"{folder}: scheduler class {name!r} is not supported by the flax sampler; "
        "use UnCLIPScheduler (prior) or DDPMScheduler (decoder), as the K2.2 folders do"
    )
