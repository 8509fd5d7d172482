"""The one training step of the flax backend: a pure function of arrays under jax.jit.

One call is one optimizer update: `lax.scan` (unrolled on CPU) runs the `accum` micro-batches
(frozen encoders, loss, grads), the mean gradient goes through optax (clip, AdamW, LR schedule),
then EMA. The state is donated, and every array is sharded over the mesh by the one rule of
sharding.py. Hyperparameters (LR, betas, clipping, Min-SNR gamma, ...) arrive as a dict of
scalars (`step_hyperparameters`), so the program depends only on shapes, dtypes, mesh and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_kandinsky import sharding as sh
from flax_kandinsky.diffusion import add_noise, diffusion_loss, get_target
from flax_kandinsky.training.optim import (
    accumulate_grads,
    adamw,
    ema_update,
    global_norm,
    windowed_lr,
)


def init_state(params, tx, use_ema: bool) -> dict:
    """The arrays that change every update (what a checkpoint holds), as a dict pytree."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if use_ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


@dataclass
class StepFn:
    """The jitted step and the shardings its arguments must have."""

    fn: Any  # (state, consts, hyper, batch, noise, timesteps) -> (state, metrics)
    state_shardings: Any
    const_shardings: Any
    hyper_sharding: Any

    def compile(self, state, consts, hyper, inputs: tuple):
        """The step compiled ahead of time for these abstract (or real) arguments; `inputs` is
        (batch, noise, timesteps), as `abstract_inputs` gives them. Calls with other shapes fail
        instead of compiling again."""
        return self.fn.lower(state, consts, hyper, *inputs).compile()


def step_hyperparameters(fixed: dict, schedule, count: int) -> dict:
    """The `hyper` argument of one update: `fixed` (optim.hyperparameters) plus the LR window of
    the optimizer's count as the host knows it (see optim.windowed_lr), all numpy scalars."""
    return {**fixed, "lr": schedule.window(count), "lr_count": np.int32(count)}


def abstract_inputs(
    stage, global_batch: int, accum: int, resolution: int, cached: bool, mesh, weighted=False
):
    """(batch, noise, timesteps) of one update as ShapeDtypeStructs with their shardings: the
    micro-batches stacked on a leading axis of `accum`, the batch as the step reads it (pixels
    and tokens, or with `cached` the encoder outputs; with `weighted` a per-example
    "loss_weight")."""
    data = sh.batch_sharding(mesh, leading=1)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct((accum, *shape), dtype, sharding=data)

    shapes = stage.batch_shapes(global_batch, resolution, cached)
    batch = {k: sds(shape, dtype) for k, (shape, dtype) in shapes.items()}
    if weighted:
        batch["loss_weight"] = sds((global_batch,), jnp.float32)
    noise = sds(stage.noise_shape(global_batch, resolution), jnp.float32)
    return batch, noise, sds((global_batch,), jnp.int32)


def split_stage(stage):
    """(graphdefs, trainable params, constants): constants = frozen encoders + the model's other
    variables (its non-params; for a LoRA run, its whole base too).

    Params and constants are pure dicts of arrays, not nnx.State: a State's Variable leaves are
    Python pytree nodes, and flattening ~250 of them (params, Adam moments) on every step call
    cost ~5 ms of host time per update, taken from the cores that run the step."""
    graphdef, params, rest = nnx.split(stage.model, stage.trainable, ...)
    frozen = {k: nnx.split(m) for k, m in stage.frozen.items()}
    graphdefs = {"model": graphdef, **{k: g for k, (g, _) in frozen.items()}}
    consts = {"model_rest": rest, **{k: s for k, (_, s) in frozen.items()}}
    return (
        graphdefs,
        nnx.to_pure_dict(params),
        jax.tree.map(nnx.to_pure_dict, consts, is_leaf=_is_state),
    )


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def encode_frozen(stage, graphdefs, consts, batch):
    """Frozen-encoder outputs of a batch (no gradient flows into the encoders)."""
    frozen = {k: nnx.merge(graphdefs[k], consts[k]) for k in stage.frozen}
    return jax.lax.stop_gradient(stage.encode(frozen, batch))


def make_encoder(stage, graphdefs, mesh, frozen):
    """Frozen-encoder outputs of one numpy micro-batch, as float32 (or bool) numpy in the
    reference layout: what the embeddings cache and the epochs' memo keep (`frozen`: the
    encoders' pure dicts, on the devices with `sh.tree_shardings`). The batch is split over
    the mesh as the step splits it; a process's batch must be the whole batch (one process)."""
    rows = sh.batch_sharding(mesh, leading=0)

    def encode(consts, batch):
        out = stage.to_torch_layout(encode_frozen(stage, graphdefs, consts, batch))
        return jax.tree.map(_as_stored, out)

    fn = jax.jit(encode, out_shardings=rows)

    def call(batch: dict) -> dict:
        inputs = {k: v for k, v in batch.items() if k != "loss_weight"}
        return jax.tree.map(np.asarray, fn(frozen, jax.device_put(inputs, rows)))

    return call


def _as_stored(x):
    return x if x.dtype == jnp.bool_ else x.astype(jnp.float32)


def encoded_batch(stage, batch, dtype):
    """A batch of stored encoder outputs as the encoders would have given them: this backend's
    layout, floats in the encoders' compute `dtype` (bfloat16 under --mixed_precision bf16, so
    a run that reads stored outputs computes what one that encodes does; None: as stored)."""
    enc = stage.from_torch_layout(batch)
    if dtype is None:
        return enc
    return {
        k: v.astype(dtype) if k != "loss_weight" and jnp.issubdtype(v.dtype, jnp.floating) else v
        for k, v in enc.items()
    }


def stage_loss(
    stage,
    graphdefs,
    params,
    consts,
    batch,
    noise,
    timesteps,
    alphas_cumprod,
    gamma,
    encoded=False,
    encoded_dtype=None,
):  # gamma: Min-SNR gamma (a number or a traced scalar) or None
    """Loss of the trainable params on one micro-batch. The frozen encoders run here, unless
    `encoded`: then `batch` holds their stored outputs (reference layout, cast to
    `encoded_dtype`)."""
    model = nnx.merge(graphdefs["model"], params, consts["model_rest"])
    if encoded:
        enc = encoded_batch(stage, batch, encoded_dtype)
    else:
        enc = encode_frozen(stage, graphdefs, consts, batch)
    x0 = stage.x0(model, enc)
    noise = noise.astype(x0.dtype)
    x_t = add_noise(x0, noise, timesteps, alphas_cumprod)
    pred = stage.predict(model, x_t, timesteps, enc)
    pt = stage.schedule.prediction_type
    target = get_target(pt, x0, noise, timesteps, alphas_cumprod)
    weights = batch.get("loss_weight")  # DreamBooth with prior preservation
    return diffusion_loss(pred, target, timesteps, alphas_cumprod, pt, gamma, weights)


def make_train_step(
    stage,
    graphdefs,
    mesh,
    state,
    consts,
    *,
    use_ema,
    decay_mask=None,
    encoded=False,
    encoded_dtype=None,
    skip_nonfinite=False,
) -> StepFn:
    """Jit the update for this stage; `state`/`consts` give shapes and shardings. The optimizer
    is `optim.adamw` over the step's `hyper` argument (`step_hyperparameters`; a "snr_gamma" key
    turns Min-SNR weighting on), built inside the trace so that no hyperparameter is a constant
    of the program. With
    `encoded`, batches are stored encoder outputs (cast to `encoded_dtype`, the encoders' compute
    dtype) and `consts` need no frozen encoders. With
    `skip_nonfinite`, an update whose loss or gradient norm is NaN/Inf leaves the whole state as
    it was (params, Adam moments and count = LR position, EMA, step) and sets metrics["skipped"]."""
    alphas_cumprod = jnp.asarray(stage.schedule.alphas_cumprod)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    # One device on CPU: the clipping norm in one reduction (optim.global_norm: fewer kernels
    # to load); across devices the concatenation would move the sharded gradients.
    one_pass_norm = on_cpu and mesh.size == 1

    def loss_fn(params, consts, batch, noise, timesteps, snr_gamma):
        inputs = (batch, noise, timesteps, alphas_cumprod, snr_gamma)
        return stage_loss(stage, graphdefs, params, consts, *inputs, encoded, encoded_dtype)

    def train_step(state, consts, hyper, batch, noise, timesteps):
        params = state["params"]
        accum = timesteps.shape[0]  # static: micro-batches per update
        gamma = hyper.get("snr_gamma")
        tx = adamw(hyper, windowed_lr(hyper["lr"], hyper["lr_count"]), decay_mask, one_pass_norm)

        def micro(grads, xs):
            b, n, t = xs
            loss, g = jax.value_and_grad(loss_fn)(params, consts, b, n, t, gamma)
            return accumulate_grads(grads, g, accum), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        if accum == 1 or on_cpu:
            # XLA:CPU hands convolutions inside a while loop to its generic emitter instead of
            # its conv library (YNNPACK): the decoder step ran 5-7x slower as a scan. A loop of
            # one trip buys nothing anywhere; elsewhere the scan keeps one body to compile.
            grads, losses = zeros, []
            for i in range(accum):
                grads, loss = micro(grads, jax.tree.map(itemgetter(i), (batch, noise, timesteps)))
                losses.append(loss)
            losses = jnp.stack(losses)
        else:
            grads, losses = jax.lax.scan(micro, zeros, (batch, noise, timesteps))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        step = state["step"] + 1
        new = {"params": params, "opt_state": opt_state, "step": step}
        if use_ema:
            new["ema"] = ema_update(state["ema"], params, step)
        # the clipping's norm, computed once: XLA merges the two
        metrics = {"loss": jnp.mean(losses), "grad_norm": global_norm(grads, one_pass_norm)}
        if skip_nonfinite:
            # A select, not a cond: both branches exist anyway, and XLA fuses it into the update.
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
            metrics["skipped"] = jnp.logical_not(ok).astype(jnp.int32)
        return new, metrics

    state_sh = sh.tree_shardings(mesh, state)
    const_sh = sh.tree_shardings(mesh, consts)
    data_sh = sh.batch_sharding(mesh, leading=1)
    fn = jax.jit(
        train_step,
        in_shardings=(state_sh, const_sh, sh.replicated(mesh), data_sh, data_sh, data_sh),
        out_shardings=(state_sh, sh.replicated(mesh)),
        donate_argnums=(0,),
    )
    return StepFn(fn, state_sh, const_sh, sh.replicated(mesh))
