"""Optimizer trajectory parity: 20 updates of clip + AdamW + LR schedule + EMA, accumulation 2.

The torch side is the torch backend's own make_optimizer/make_lr_scheduler plus accelerate's
semantics (loss / accum per micro-step, grads summed, clip_grad_norm_ once, optimizer and
scheduler stepped once per update, EMAModel.step after it); the flax side is
flax_kandinsky.training.optim inside one jitted update per optimizer step. The same 40 micro
gradient sets, drawn once in numpy, drive both.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers.training_utils import EMAModel

from flax_kandinsky.training.optim import (
    LRSchedule,
    accumulate_grads,
    ema_init,
    ema_update,
    make_optimizer,
)
from parity_tests.conftest import rel_l2
from torch_kandinsky.training.optim import make_lr_scheduler
from torch_kandinsky.training.optim import make_optimizer as make_torch_optimizer

UPDATES, ACCUM = 20, 2
SHAPES = {"conv": (3, 3, 4, 6), "kernel": (16, 8), "bias": (8,), "gain": (1,)}

CASES = {
    # name: (schedule, warmup, step_rules, weight decay, gradient scale)
    "cosine_w5_noclip": ("cosine", 5, None, 1e-2, 1e-2),
    "polynomial_w3_clip": ("polynomial", 3, None, 1e-1, 10.0),
    "piecewise_partclip": ("piecewise_constant", 0, "1:6,0.3:12,0.1", 5e-2, 0.05),
}


def make_cfg(schedule, warmup, rules, wd):
    return SimpleNamespace(
        learning_rate=1e-2,
        lr_scheduler=schedule,
        lr_warmup_steps=warmup,
        lr_step_rules=rules,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=wd,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        use_8bit_adam=False,
    )


def draw(scale, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    # Per-leaf scales differ so that the global norm mixes leaves of unequal size; the
    # per-update factor moves the norm of the mean gradient over a 3x range.
    grads = [
        {
            k: (scale * (1 + 0.5 * np.sin(j // ACCUM)) * (i + 1) * rng.standard_normal(s))
            for i, (k, s) in enumerate(SHAPES.items())
        }
        for j in range(UPDATES * ACCUM)
    ]
    grads = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads]
    return params, grads


def run_torch(cfg, params, grads):
    model = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    )
    opt = make_torch_optimizer(cfg, model)
    sched = make_lr_scheduler(cfg, opt, UPDATES)
    ema = EMAModel([p.detach().clone() for p in model.parameters()])  # make_ema's defaults
    lrs, norms = [], []
    for u in range(UPDATES):
        for m in range(ACCUM):
            g = grads[u * ACCUM + m]
            # accelerator.backward: loss / accum, gradients accumulate in .grad
            loss = sum((model[k] * torch.from_numpy(g[k])).sum() for k in SHAPES)
            (loss / ACCUM).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema.step(model.parameters())
    final = {k: model[k].detach().numpy().copy() for k in SHAPES}
    names = [n for n, _ in model.named_parameters()]  # ParameterDict's order, not SHAPES'
    ema_final = {n: s.numpy().copy() for n, s in zip(names, ema.shadow_params, strict=True)}
    return final, ema_final, np.array(lrs), np.array(norms)


def run_flax(cfg, params, grads):
    tx = make_optimizer(cfg, UPDATES)

    @jax.jit
    def update(params, opt_state, ema, step, micro_grads):
        def micro(acc, g):
            return accumulate_grads(acc, g, ACCUM), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        mean_grads, _ = jax.lax.scan(micro, zeros, micro_grads)
        updates, opt_state = tx.update(mean_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        step = step + 1
        return params, opt_state, ema_update(ema, params, step), step

    p = {k: jnp.asarray(v) for k, v in params.items()}
    opt_state, ema, step = tx.init(p), ema_init(p), jnp.zeros((), jnp.int32)
    for u in range(UPDATES):
        window = grads[u * ACCUM : (u + 1) * ACCUM]
        micro_grads = {k: jnp.asarray(np.stack([g[k] for g in window])) for k in SHAPES}
        p, opt_state, ema, step = update(p, opt_state, ema, step, micro_grads)
    assert int(step) == UPDATES
    return {k: np.asarray(v) for k, v in p.items()}, {k: np.asarray(v) for k, v in ema.items()}


def flat(tree):
    return np.concatenate([np.ravel(tree[k]) for k in SHAPES]).astype(np.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_torch(case, tol):
    schedule, warmup, rules, wd, scale = CASES[case]
    cfg = make_cfg(schedule, warmup, rules, wd)
    params, grads = draw(scale)
    t_params, t_ema, t_lrs, t_norms = run_torch(cfg, params, grads)
    f_params, f_ema = run_flax(cfg, params, grads)

    # identical LRs: the flax table is torch's schedule, value for value
    np.testing.assert_array_equal(LRSchedule(cfg, UPDATES).table, t_lrs)
    if case.endswith("noclip"):
        assert t_norms.max() < 1.0
    elif case.endswith("_clip"):
        assert t_norms.min() > 1.0  # clipped on every update
    else:
        assert t_norms.min() < 1.0 < t_norms.max()

    init = flat(params)
    figures = {
        "params": rel_l2(flat(f_params), flat(t_params)),
        "ema": rel_l2(flat(f_ema), flat(t_ema)),
        # displacements from the start: the stricter view of the same trajectories
        "params_delta": rel_l2(flat(f_params) - init, flat(t_params) - init),
        "ema_delta": rel_l2(flat(f_ema) - init, flat(t_ema) - init),
    }
    print(f"\n{case}: " + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
    assert np.linalg.norm(flat(t_params) - init) > 1e-2 * np.linalg.norm(init)  # it moved
    for v in figures.values():
        assert v <= tol["trajectory_params"]
