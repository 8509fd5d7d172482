"""diffusers' `get_scheduler` learning-rate schedules as numpy tables, one value per update.

The torch backend steps diffusers' LambdaLR once after every optimizer update, so update k
(0-based) runs at `base_lr * lr_lambda(k)`. The lambdas below are ports of
diffusers/optimization.py (0.42.1) with the same Python float expressions in the same order,
so the tables equal diffusers' values bit for bit. The flax backend looks its LR up in such a
table; both backends therefore use identical schedules, never two implementations of one formula.

Tables are float64: the lambdas and torch's `group["lr"]` are Python floats (doubles), so a
float64 table is exactly what torch uses; the flax side rounds it to float32 once, when the table
becomes a device array (float32 is the dtype of every other optimizer quantity there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from kandinsky_common.errors import UserError

LR_SCHEDULER_NAMES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
POLYNOMIAL_LR_END = 1e-7  # diffusers' default; get_scheduler never overrides it


class ScheduleConfig(Protocol):
    """What `learning_rates` reads; TrainConfig satisfies it."""

    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    lr_step_rules: str | None


def parse_step_rules(step_rules: str) -> tuple[dict[int, float], float]:
    """'1:10,0.1:20,0.01' -> ({10: 1.0, 20: 0.1}, 0.01): multiplier 1 before update 10, 0.1 before
    update 20, then 0.01. Parsed like diffusers (a repeated step keeps the last multiplier)."""
    rule_list = step_rules.split(",")
    rules: dict[int, float] = {}
    try:
        for rule_str in rule_list[:-1]:
            value_str, steps_str = rule_str.split(":")
            rules[int(steps_str)] = float(value_str)
        last = float(rule_list[-1])
    except ValueError:
        raise UserError(
            f"--lr_step_rules {step_rules!r} is malformed; write multiplier:until_update pairs "
            "then the final multiplier, e.g. '1:100,0.1:200,0.01'"
        ) from None
    return rules, last


def multiplier_fn(
    name: str,
    num_warmup_steps: int,
    num_training_steps: int,
    step_rules: str | None = None,
    num_cycles: int = 1,
    power: float = 1.0,
    base_lr: float | None = None,
) -> Callable[[int], float]:
    """diffusers' lr_lambda for `get_scheduler(name, ...)`: update index -> LR multiplier.

    Like get_scheduler, `num_cycles` only reaches cosine_with_restarts (cosine keeps its own 0.5)
    and `power` only polynomial. polynomial's multiplier is `lr / base_lr`, so it needs `base_lr`.
    """
    warmup, total = num_warmup_steps, num_training_steps
    if name == "constant":
        return lambda _: 1.0
    if name == "piecewise_constant":
        if not step_rules:
            raise UserError(
                "--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. '1:100,0.1'"
            )
        rules, last = parse_step_rules(step_rules)
        sorted_steps = sorted(rules)

        def piecewise(step: int) -> float:
            for s in sorted_steps:
                if step < s:
                    return rules[s]
            return last

        return piecewise
    if name == "constant_with_warmup":

        def constant_with_warmup(step: int) -> float:
            if step < warmup:
                return float(step) / float(max(1.0, warmup))
            return 1.0

        return constant_with_warmup
    if name == "linear":
        f_min, f_max = 0.0, 1.0

        def linear(step: int) -> float:
            if step < warmup:
                return f_max * float(step) / float(max(1, warmup))
            progress = float(total - step) / float(max(1, total - warmup))
            return f_min + (f_max - f_min) * max(0.0, progress)

        return linear
    if name == "cosine":
        cycles = 0.5

        def cosine(step: int) -> float:
            if step < warmup:
                return float(step) / float(max(1, warmup))
            progress = float(step - warmup) / float(max(1, total - warmup))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))

        return cosine
    if name == "cosine_with_restarts":

        def cosine_with_restarts(step: int) -> float:
            if step < warmup:
                return float(step) / float(max(1, warmup))
            progress = float(step - warmup) / float(max(1, total - warmup))
            if progress >= 1.0:
                return 0.0
            return max(
                0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0)))
            )

        return cosine_with_restarts
    if name == "polynomial":
        if base_lr is None:
            raise ValueError("the polynomial schedule's multiplier depends on base_lr; pass it")
        lr_init, lr_end = base_lr, POLYNOMIAL_LR_END
        if not lr_init > lr_end:
            raise UserError(
                f"--lr_scheduler polynomial decays to {lr_end}, so --learning_rate ({lr_init}) "
                "must be larger; raise it or choose another schedule"
            )

        def polynomial(step: int) -> float:
            if step < warmup:
                return float(step) / float(max(1, warmup))
            if step > total:
                return lr_end / lr_init
            lr_range = lr_init - lr_end
            decay_steps = total - warmup
            if decay_steps == 0:
                # diffusers divides by zero here (step == warmup == total); its limit is lr_end.
                return lr_end / lr_init
            pct_remaining = 1 - (step - warmup) / decay_steps
            decay = lr_range * pct_remaining**power + lr_end
            return decay / lr_init

        return polynomial
    raise UserError(f"--lr_scheduler {name!r} is unknown; choose one of {LR_SCHEDULER_NAMES}")


def lr_multipliers(
    name: str,
    num_updates: int,
    warmup: int,
    step_rules: str | None = None,
    num_cycles: int = 1,
    power: float = 1.0,
    *,
    base_lr: float | None = None,
    num_training_steps: int | None = None,
) -> np.ndarray:
    """float64 (num_updates,): the multiplier diffusers applies to the base LR at update k.

    `num_training_steps` (the schedule's horizon) defaults to `num_updates`, as in the torch
    backend, which passes max_train_steps to get_scheduler.
    """
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    total = num_updates if num_training_steps is None else num_training_steps
    fn = multiplier_fn(name, warmup, total, step_rules, num_cycles, power, base_lr)
    # A Python loop, not numpy ufuncs: math.cos and np.cos may differ in the last bit.
    return np.fromiter((fn(k) for k in range(num_updates)), dtype=np.float64, count=num_updates)


def learning_rates(
    cfg: ScheduleConfig, num_updates: int, base_lr: float | None = None
) -> np.ndarray:
    """float64 (num_updates,): the LR of optimizer update k, `base_lr * multiplier` as LambdaLR
    computes it; `base_lr` defaults to cfg.learning_rate, the horizon is `num_updates`."""
    base = cfg.learning_rate if base_lr is None else base_lr
    mult = lr_multipliers(
        cfg.lr_scheduler,
        num_updates,
        cfg.lr_warmup_steps,
        cfg.lr_step_rules,
        base_lr=base,
    )
    # float64 multiply = LambdaLR's Python `base_lr * lmbda(k)`, bit for bit.
    return base * mult


def learning_rate_at(cfg: ScheduleConfig, num_updates: int, step: int) -> float:
    """LR of update `step` (0-based) for the horizon `num_updates`, any step, as a Python float.

    After `step` updates this is what torch's `lr_scheduler.get_last_lr()[0]` reports, including
    step == num_updates (past the end of the table), so the two backends log the same value.
    """
    fn = multiplier_fn(
        cfg.lr_scheduler,
        cfg.lr_warmup_steps,
        num_updates,
        cfg.lr_step_rules,
        base_lr=cfg.learning_rate,
    )
    return cfg.learning_rate * fn(step)
