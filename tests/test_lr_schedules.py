"""kandinsky_common.lr_schedules against diffusers' get_scheduler stepped on a torch optimizer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kandinsky_common.errors import UserError
from kandinsky_common.lr_schedules import (
    LR_SCHEDULER_NAMES,
    learning_rate_at,
    learning_rates,
    lr_multipliers,
    parse_step_rules,
)

torch = pytest.importorskip("torch")

BASE_LR = 3e-4
# (table length, warmup, horizon): horizon None = the table length, as in the torch backend;
# warmup beyond the horizon and tables past the horizon reach every branch of the lambdas.
CASES = [(1, 0, None), (10, 0, None), (10, 3, None), (37, 5, None), (20, 20, None), (15, 40, None)]
CASES += [(100, 10, None), (30, 4, 20), (12, 12, 8)]
RULES = "1:10,0.1:20,0.01"


def torch_lrs(name, n, warmup, horizon, step_rules=None, num_cycles=1, power=1.0):
    """LR of each of n updates and get_last_lr() after the n-th, stepped as the loop does."""
    from diffusers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    sched = get_scheduler(
        name,
        opt,
        step_rules=step_rules,
        num_warmup_steps=warmup,
        num_training_steps=horizon,
        num_cycles=num_cycles,
        power=power,
    )
    lrs, lambdas, last = [], [], None
    for k in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        lambdas.append(sched.lr_lambdas[0](k))
        opt.step()
        try:
            sched.step()
            last = sched.get_last_lr()[0]
        except ZeroDivisionError:
            # diffusers' polynomial divides by total - warmup at step == total; None marks it.
            assert k == n - 1 and name == "polynomial" and warmup == horizon
            last = None
    return np.array(lrs, np.float64), np.array(lambdas, np.float64), last


@pytest.mark.parametrize("name", LR_SCHEDULER_NAMES)
@pytest.mark.parametrize("n,warmup,horizon", CASES)
def test_tables_equal_diffusers_exactly(name, n, warmup, horizon):
    total = n if horizon is None else horizon
    rules = RULES if name == "piecewise_constant" else None
    ref_lrs, ref_mult, ref_last = torch_lrs(name, n, warmup, total, rules)
    mult = lr_multipliers(name, n, warmup, rules, base_lr=BASE_LR, num_training_steps=horizon)
    assert mult.shape == (n,) and mult.dtype == np.float64
    np.testing.assert_array_equal(mult, ref_mult)
    if horizon is None:
        cfg = SimpleNamespace(
            learning_rate=BASE_LR, lr_scheduler=name, lr_warmup_steps=warmup, lr_step_rules=rules
        )
        np.testing.assert_array_equal(learning_rates(cfg, n), ref_lrs)
        if ref_last is None:
            assert learning_rate_at(cfg, n, n) == pytest.approx(1e-7)  # the limit, not a crash
        else:
            assert learning_rate_at(cfg, n, n) == ref_last
        assert [learning_rate_at(cfg, n, k) for k in range(n)] == ref_lrs.tolist()


@pytest.mark.parametrize("num_cycles", [2, 3])
def test_cosine_with_restarts_cycles(num_cycles):
    _, ref, _ = torch_lrs("cosine_with_restarts", 45, 5, 40, num_cycles=num_cycles)
    ours = lr_multipliers(
        "cosine_with_restarts", 45, 5, num_cycles=num_cycles, num_training_steps=40
    )
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("power", [0.5, 2.0, 3.0])
def test_polynomial_power(power):
    ref_lrs, ref, _ = torch_lrs("polynomial", 30, 4, 25, power=power)
    ours = lr_multipliers("polynomial", 30, 4, power=power, base_lr=BASE_LR, num_training_steps=25)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(BASE_LR * ours, ref_lrs)
    assert ours[-1] * BASE_LR == pytest.approx(1e-7)  # past the horizon: lr_end


@pytest.mark.parametrize("rules", ["0.5", "1:5,0.2:3,0.05", "2:4,1:4,0.3", " 1:3, 0.5:6 ,0.25"])
def test_piecewise_rule_strings(rules):
    _, ref, _ = torch_lrs("piecewise_constant", 10, 0, 10, step_rules=rules)
    np.testing.assert_array_equal(lr_multipliers("piecewise_constant", 10, 0, rules), ref)


def test_parse_step_rules():
    assert parse_step_rules("1:10,0.1:20,0.01") == ({10: 1.0, 20: 0.1}, 0.01)
    for bad in ["1:10,0.1:20", "a:10,0.1", "1-10,0.1", "1:10:3,0.1"]:
        with pytest.raises(UserError, match="lr_step_rules"):
            parse_step_rules(bad)


def test_user_errors():
    with pytest.raises(UserError, match="needs --lr_step_rules"):
        lr_multipliers("piecewise_constant", 4, 0)
    with pytest.raises(UserError, match="must be larger"):
        lr_multipliers("polynomial", 4, 0, base_lr=1e-8)
    with pytest.raises(UserError, match="unknown"):
        lr_multipliers("exponential", 4, 0)
    with pytest.raises(ValueError, match="base_lr"):
        lr_multipliers("polynomial", 4, 0)
