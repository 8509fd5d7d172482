"""flax_kandinsky.training.optim without torch: schedules, clipping, AdamW, accumulation, EMA."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_kandinsky.training.optim import (
    LRSchedule,
    accumulate_grads,
    adamw,
    clip_by_global_norm_torch,
    ema_decay,
    ema_init,
    ema_one_minus_decay,
    ema_update,
    global_norm,
    make_optimizer,
    optimizer_hyperparameters,
    scale_by_adam_torch,
    windowed_lr,
)
from kandinsky_common.flags import TrainConfig
from kandinsky_common.lr_schedules import LR_SCHEDULER_NAMES

LR = 1e-3


def cfg_for(name="constant", warmup=0, rules=None, wd=0.0, max_grad_norm=1.0):
    return SimpleNamespace(
        learning_rate=LR,
        lr_scheduler=name,
        lr_warmup_steps=warmup,
        lr_step_rules=rules,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=wd,
        adam_epsilon=1e-8,
        max_grad_norm=max_grad_norm,
    )


def tree(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = {"a": (4, 3), "b": (5,), "c": (2, 2, 2)}
    return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("name", LR_SCHEDULER_NAMES)
def test_schedule_table_shape_and_lookup(name):
    rules = "1:3,0.5:7,0.1" if name == "piecewise_constant" else None
    sched = LRSchedule(cfg_for(name, warmup=4, rules=rules), 12)
    assert sched.table.shape == (12,) and sched.table.dtype == np.float64
    assert np.all(sched.table >= 0) and np.all(sched.table <= LR)
    counts = jnp.arange(15)  # past the horizon the last entry is held
    got = np.asarray(jax.jit(jax.vmap(sched))(counts))
    want = sched.table.astype(np.float32)[np.minimum(np.arange(15), 11)]
    np.testing.assert_array_equal(got, want)
    for k in range(12):
        assert sched.current_lr(k) == sched.table[k]


def test_schedule_ends():
    n, w = 20, 5
    lin = LRSchedule(cfg_for("linear", w), n)
    assert lin.table[0] == 0.0 and lin.table[w] == LR
    assert lin.table[-1] == pytest.approx(LR / (n - w)) and lin.current_lr(n) == 0.0
    cos = LRSchedule(cfg_for("cosine", w), n)
    assert cos.table[w - 1] == pytest.approx(LR * (w - 1) / w) and cos.table[w] == LR
    assert 0 < cos.table[-1] < 0.02 * LR and cos.current_lr(n) == 0.0
    assert np.all(LRSchedule(cfg_for("constant", w), n).table == LR)  # constant ignores warmup
    cw = LRSchedule(cfg_for("constant_with_warmup", w), n).table
    assert cw[0] == 0.0 and np.all(cw[w:] == LR)
    poly = LRSchedule(cfg_for("polynomial", w), n)
    assert poly.current_lr(n) == pytest.approx(1e-7) and poly.table[w] == pytest.approx(LR)
    pw = LRSchedule(cfg_for("piecewise_constant", rules="1:3,0.5:7,0.1"), 10).table / LR
    np.testing.assert_allclose(pw, [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError):
        LRSchedule(cfg_for(), 0)


def test_make_optimizer_reads_train_config():
    cfg = TrainConfig()
    tx = make_optimizer(cfg, 3)
    p = tree()
    g = jax.tree.map(jnp.ones_like, p)
    updates, _ = tx.update(g, tx.init(p), p)
    # constant schedule, first Adam step: -lr * sign(g); the (all-ones) norm is clipped to 1
    # first, which leaves the Adam direction unchanged.
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(u, -cfg.learning_rate, rtol=1e-6)


def test_clip_matches_torch_formula():
    clip = clip_by_global_norm_torch(1.0)
    g = {"x": jnp.array([3.0, 4.0]), "y": jnp.zeros(3)}
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(out["x"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-7)
    small = {"x": jnp.array([0.3, 0.4])}
    np.testing.assert_array_equal(clip.update(small, ())[0]["x"], small["x"])  # coef exactly 1
    zeros = {"x": jnp.zeros(2)}
    np.testing.assert_array_equal(clip.update(zeros, ())[0]["x"], 0.0)
    # optax's clip has no 1e-6: the two differ by about 1e-6 / norm on a clipped update
    ref, _ = optax.clip_by_global_norm(1.0).update(g, ())
    ratio = np.asarray(out["x"]) / np.asarray(ref["x"])
    np.testing.assert_allclose(ratio, 5.0 / (5.0 + 1e-6), rtol=1e-7)


@pytest.mark.parametrize("one_pass", [False, True])
def test_clip_matches_torch_formula_in_either_norm(one_pass):
    clip = clip_by_global_norm_torch(1.0, one_pass)
    g = {"x": jnp.array([3.0, 4.0]), "y": jnp.zeros((3, 2))}
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(out["x"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-7)
    assert out["y"].shape == (3, 2)


def _fusions(fn, *args) -> int:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return hlo.split("\nENTRY ")[1].count(" fusion(")


def test_one_pass_norm_is_the_norm_in_fewer_kernels():
    rng = np.random.default_rng(0)
    tree = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(64, 3, 3, 8), (8,), (5, 7)] * 8]
    expected = math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in tree))
    for one_pass in (False, True):
        np.testing.assert_allclose(float(global_norm(tree, one_pass)), expected, rtol=1e-6)
    # XLA:CPU: a sum of squares per array (and their sum), against one reduction
    per_leaf = _fusions(lambda t: global_norm(t, False), tree)
    one = _fusions(lambda t: global_norm(t, True), tree)
    assert one <= 2 and per_leaf >= len(tree) // 2, (per_leaf, one)


def torch_adam_directions(grads, b1=0.9, b2=0.999, eps=1e-8):
    """torch's single-tensor Adam in numpy: float32 moments, bias corrections in double.

    Returns the per-step direction, the update of torch's `addcdiv_` at lr = 1.
    """
    f32 = np.float32
    m = v = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = m + f32(1 - b1) * (g - m)  # lerp_(g, 1 - b1)
        v = v * f32(b2) + f32(1 - b2) * (g * g)  # mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = np.sqrt(v) / f32(math.sqrt(1 - b2**t)) + f32(eps)
        out.append(f32(1 / (1 - b1**t)) * (m / denom))
    return out


def test_adam_bias_correction_in_double_precision():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(256).astype(np.float32) for _ in range(6)]
    ref = torch_adam_directions(grads)
    ours, optax_adam = scale_by_adam_torch(0.9, 0.999, 1e-8), optax.scale_by_adam(0.9, 0.999, 1e-8)
    s1, s2 = ours.init(jnp.zeros(256)), optax_adam.init(jnp.zeros(256))
    err_ours, err_optax = [], []
    for g, r in zip(grads, ref):
        u1, s1 = ours.update(jnp.asarray(g), s1)
        u2, s2 = optax_adam.update(jnp.asarray(g), s2)
        err_ours.append(np.linalg.norm(np.asarray(u1, np.float64) - r) / np.linalg.norm(r))
        err_optax.append(np.linalg.norm(np.asarray(u2, np.float64) - r) / np.linalg.norm(r))
    assert max(err_ours) < 5e-7
    assert max(err_optax) > 3e-6  # 1 - 0.999**t in float32: why scale_by_adam_torch exists
    assert isinstance(s1, optax.ScaleByAdamState) and int(s1.count) == 6


def test_adamw_step_and_decay_mask():
    cfg = cfg_for(wd=0.1, max_grad_norm=100.0)
    p = tree()
    g = tree(seed=1, scale=0.1)
    mask = {"a": True, "b": False, "c": True}
    tx = make_optimizer(cfg, 5, decay_mask=mask)
    updates, state = tx.update(g, tx.init(p), p)
    new = optax.apply_updates(p, updates)
    for k in p:
        # torch: p(1 - lr wd) - lr m^/(sqrt(v^) + eps); the first step's direction is sign(g)
        wd = 0.1 if mask[k] else 0.0
        pk, gk = np.asarray(p[k], np.float64), np.asarray(g[k], np.float64)
        want = pk * (1 - LR * wd) - LR * gk / (np.abs(gk) + 1e-8)
        np.testing.assert_allclose(new[k], want, rtol=1e-6, atol=1e-9)


def test_accumulation_is_the_mean_and_steps_once():
    micro = [tree(seed=s) for s in range(4)]
    acc = jax.tree.map(jnp.zeros_like, micro[0])
    for g in micro:
        acc = accumulate_grads(acc, g, 4)
    for k in acc:
        # 4 is a power of two: sum of g/4 is exactly the mean computed as (sum g)/4 in order
        total = micro[0][k] / 4 + micro[1][k] / 4 + micro[2][k] / 4 + micro[3][k] / 4
        np.testing.assert_array_equal(acc[k], total)
        np.testing.assert_allclose(acc[k], np.mean([m[k] for m in micro], axis=0), rtol=1e-6)

    # One tx.update per accumulation window: the update count (LR index, bias correction)
    # advances once per window, not per micro-batch.
    cfg = cfg_for("linear", warmup=2)
    tx = make_optimizer(cfg, 6)
    p = tree()
    state = tx.init(p)
    zeros = jax.tree.map(jnp.zeros_like, p)

    @jax.jit
    def update(p, state, window):
        mean = jax.lax.scan(lambda a, g: (accumulate_grads(a, g, 2), None), zeros, window)[0]
        u, state = tx.update(mean, state, p)
        return optax.apply_updates(p, u), state

    for w in range(3):
        window = jax.tree.map(lambda *x: jnp.stack(x), *micro[w % 2 * 2 : w % 2 * 2 + 2])
        p, state = update(p, state, window)
    counts = [
        leaf for leaf in jax.tree.leaves(state) if leaf.shape == () and leaf.dtype == jnp.int32
    ]
    assert [int(c) for c in counts] == [3, 3]  # Adam count and schedule count


def test_ema_decay_values():
    assert float(ema_decay(1)) == 0.0  # the first update copies
    assert float(ema_decay(2)) == pytest.approx(2 / 11, rel=1e-7)
    assert float(ema_decay(10)) == pytest.approx(10 / 19, rel=1e-7)
    assert float(ema_decay(100_000)) == pytest.approx(0.9999, rel=1e-7)
    assert float(ema_decay(0)) == 0.0
    assert float(ema_decay(5, update_after_step=10)) == 0.0
    assert float(ema_decay(3, min_decay=0.5)) == pytest.approx(0.5)


def test_ema_one_minus_decay_equals_diffusers_double_rounded():
    steps = [1, 2, 3, 10, 100, 1234, 89_989, 89_990, 89_991, 89_992, 100_000, 10**6]
    steps += list(range(1, 90_000, 997))

    def diffusers(step):  # EMAModel.get_decay then 1 - decay, in double; torch rounds it
        s = max(0, step - 1)
        return 1.0 - (0.0 if s <= 0 else min((1 + s) / (10 + s), 0.9999))

    got = np.asarray(jax.jit(jax.vmap(ema_one_minus_decay))(jnp.asarray(steps)))
    np.testing.assert_array_equal(got, np.float32([diffusers(s) for s in steps]))


def test_ema_update_formula_and_first_copy():
    params0, params1, params2 = tree(0), tree(1), tree(2)
    ema = ema_init(params0)
    assert all(e is not p for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params0)))
    step = jax.jit(ema_update)
    ema = step(ema, params1, jnp.int32(1))
    for k in ema:
        np.testing.assert_allclose(ema[k], params1[k], rtol=1e-6, atol=1e-7)  # decay 0
    ema2 = step(ema, params2, jnp.int32(2))
    for k in ema:
        e = np.asarray(ema[k])
        want = e - np.float32(9 / 11) * (e - np.asarray(params2[k]))
        np.testing.assert_allclose(ema2[k], want, rtol=1e-6, atol=1e-7)


def test_windowed_lr_is_the_table_entry_of_the_count_when_the_host_is_one_behind():
    """The host dispatches update u with the window of its count c; if the update still in
    flight was skipped the optimizer's count is c - 1: both read the table's entry."""
    sched = LRSchedule(cfg_for("linear", warmup=3), 8)
    for c in range(10):
        lr = windowed_lr(jnp.asarray(sched.window(c)), jnp.int32(c))
        for count in {max(c - 1, 0), c}:
            assert lr(jnp.int32(count)) == sched(count), (c, count)


def test_runtime_hyperparameters_update_exactly_as_constants():
    """adamw over traced hyperparameters (as the compiled step reads them) gives bit for bit
    the updates of make_optimizer's constants: the move to runtime inputs changed no number."""
    cfg = cfg_for("cosine", warmup=2, wd=0.01, max_grad_norm=0.5)
    n = 5
    sched = LRSchedule(cfg, n)
    tx = make_optimizer(cfg, n)

    @jax.jit
    def runtime_update(grads, opt_state, params, hyper):
        traced = adamw(hyper, windowed_lr(hyper["lr"], hyper["lr_count"]))
        return traced.update(grads, opt_state, params)

    params = tree(0)
    a_state, b_state = tx.init(params), tx.init(params)
    a_params, b_params = params, params
    for count in range(n):
        grads = tree(count + 1, scale=3.0)
        hyper = {**optimizer_hyperparameters(cfg), "lr": sched.window(count)}
        hyper["lr_count"] = np.int32(count)
        a_up, a_state = tx.update(grads, a_state, a_params)
        b_up, b_state = runtime_update(grads, b_state, b_params, hyper)
        a_params, b_params = (
            optax.apply_updates(a_params, a_up),
            optax.apply_updates(b_params, b_up),
        )
        for k in params:
            np.testing.assert_array_equal(np.asarray(a_params[k]), np.asarray(b_params[k]))
