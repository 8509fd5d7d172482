"""The one training step of the torch backend, shared by both stages: `train_step` is one
optimizer update (as flax's), made of `micro_step`s under gradient accumulation."""

from __future__ import annotations

import numpy as np
import torch

from kandinsky_common.errors import NonFiniteLoss
from torch_kandinsky.diffusion import add_noise, diffusion_loss, get_target


def stage_loss(
    stage, model, enc, noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma=None, weights=None
):
    """Loss of `model` on encoder outputs `enc` with the given noise and timesteps (and
    per-example `weights`)."""
    x0 = stage.x0(enc)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    timesteps = timesteps.to(x0.device)
    ac = stage.alphas_cumprod.to(x0.device)
    x_t = add_noise(x0, noise, timesteps, ac)
    pred = stage.predict(model, x_t, timesteps, enc)
    pt = stage.schedule.prediction_type
    target = get_target(pt, x0, noise, timesteps, ac)
    return diffusion_loss(pred, target, timesteps, ac, pt, snr_gamma, weights)


class SkippedUpdates:
    """--skip_nonfinite_updates: state carried across the micro-steps of one update, and the
    count of skipped updates (restored from the checkpoint when a run resumes)."""

    def __init__(self, count: int = 0):
        self.count = count
        self.poisoned = False  # a micro-step of the current update had a non-finite loss
        self.last_skipped = False  # whether the update that just ended was skipped


def train_step(
    accelerator,
    stage,
    model,
    optimizer,
    lr_scheduler,
    ema,
    micros: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]],
    *,
    max_grad_norm: float,
    snr_gamma: float | None,
    encoded: bool = False,
    skip: SkippedUpdates | None = None,
) -> float:
    """One optimizer update: a micro_step per (batch, noise, timesteps) of `micros` (gradient
    accumulation), then the LR schedule and the EMA, unless the update was skipped. Returns this
    process's mean loss over the micro-batches."""
    losses = [
        micro_step(
            accelerator,
            stage,
            model,
            optimizer,
            batch,
            noise,
            timesteps,
            max_grad_norm=max_grad_norm,
            snr_gamma=snr_gamma,
            encoded=encoded,
            skip=skip,
        )
        for batch, noise, timesteps in micros
    ]
    if not accelerator.sync_gradients:
        raise RuntimeError(
            f"{len(micros)} micro-batches do not end an update of "
            f"{accelerator.gradient_accumulation_steps}"
        )
    skipped = skip is not None and skip.last_skipped  # nothing may move then
    if not accelerator.optimizer_step_was_skipped and not skipped:
        lr_scheduler.step()
    if ema is not None and not skipped:
        ema.step(accelerator.unwrap_model(model).parameters())
    return float(np.mean(losses))


def micro_step(
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
    skip: SkippedUpdates | None = None,
) -> float:
    """One micro-step: encode (frozen; skipped when `batch` holds cached encoder outputs), loss,
    backward; on an update boundary clip and step.

    A non-finite loss or gradient norm raises NonFiniteLoss before the weights change; with `skip`
    the update is dropped instead (no optimizer step: weights and Adam state stay) and counted.
    """
    with accelerator.accumulate(model):
        weights = batch.get("loss_weight")  # DreamBooth with prior preservation: float32
        batch = {k: v for k, v in batch.items() if k != "loss_weight"}
        dev = stage.to_device(batch, accelerator.device, stage.weight_dtype)
        enc = dev if encoded else stage.encode(dev)
        loss = stage_loss(
            stage,
            model,
            enc,
            torch.from_numpy(noise),
            torch.from_numpy(timesteps),
            snr_gamma,
            None if weights is None else torch.from_numpy(np.asarray(weights)),
        )
        value = loss.detach().float().item()
        # Default mode on several processes: raising alone would leave the other processes
        # waiting in the gradient all-reduce forever, so all of them decide at the boundary.
        agree = skip is None and accelerator.num_processes > 1
        if not np.isfinite(value):
            if skip is not None:
                skip.poisoned = True
            elif not agree:
                raise NonFiniteLoss(_loss_message(value, accelerator))
            elif _HELD["loss"] is None:
                _HELD["loss"] = value
        accelerator.backward(loss)
        if accelerator.sync_gradients and agree:
            held, _HELD["loss"] = _HELD["loss"], None
            if any_process(accelerator, held is not None):
                bad = held if held is not None else "non-finite on another process"
                raise NonFiniteLoss(_loss_message(bad, accelerator))
        if accelerator.sync_gradients:
            params = [p for p in model.parameters() if p.requires_grad]
            norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
            # fp16: inf gradients are the loss scaler's to skip (and to rescale), not an error.
            finite = accelerator.scaler is not None or np.isfinite(norm)
            if skip is None and not finite:
                raise NonFiniteLoss(
                    f"the gradient norm became {norm} at optimizer update "
                    f"{optimizer_update(accelerator)}; lower --learning_rate and resume from the "
                    "last checkpoint, or pass --skip_nonfinite_updates"
                )
            if skip is not None:
                bad = any_process(accelerator, skip.poisoned or not finite)
                skip.poisoned, skip.last_skipped = False, bad
                if bad:
                    skip.count += 1
                    optimizer.zero_grad(set_to_none=True)
                    return value
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return value


# Default mode (no --skip_nonfinite_updates) on several processes: this process's first
# non-finite loss of the current update, held until all processes agree at the boundary.
_HELD: dict[str, float | None] = {"loss": None}


def _loss_message(value, accelerator) -> str:
    return (
        f"the loss became {value} at optimizer update {optimizer_update(accelerator)}; lower "
        "--learning_rate or use --mixed_precision bf16 instead of fp16 and resume from the last "
        "checkpoint, or pass --skip_nonfinite_updates"
    )


def any_process(accelerator, flag: bool) -> bool:
    """Whether any process raised `flag`: all processes skip an update or stop together (a local
    loss can be inf with finite synced gradients; one host can be told to stop)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def optimizer_update(accelerator) -> int:
    return accelerator.step // max(accelerator.gradient_accumulation_steps, 1)
