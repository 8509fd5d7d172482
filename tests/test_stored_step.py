"""The step's program stored between runs (flax_kandinsky.training.stored_step): a stored entry is
compiled without tracing the step, the result is the plain step's, the state stays donated, a
damaged entry is traced again and replaced, and the key tells apart everything the trace reads."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_kandinsky import sharding as sh
from flax_kandinsky.training import stored_step
from flax_kandinsky.training.step import StepFn

MESH = sh.make_mesh("data=4,fsdp=2")


def _step(traces: list) -> StepFn:
    """A StepFn of the loop's signature over a state with integer keys (as the networks' layer
    lists give), which jax.export's own tree serialization refuses."""

    def train_step(state, consts, hyper, batch, noise, timesteps):
        traces.append(1)
        w = state["params"][0]
        pred = batch["x"][0] @ w + consts["b"] + noise[0] * hyper["scale"]
        loss = jnp.mean((pred - timesteps[0][:, None]) ** 2)
        new = {"params": {0: w - hyper["lr"] * loss}, "step": state["step"] + 1}
        return new, {"loss": loss}

    state = _abstract_state()
    state_sh = sh.tree_shardings(MESH, state)
    consts_sh = sh.tree_shardings(MESH, {"b": jax.ShapeDtypeStruct((4,), jnp.float32)})
    data = sh.batch_sharding(MESH, leading=1)
    fn = jax.jit(
        train_step,
        in_shardings=(state_sh, consts_sh, sh.replicated(MESH), data, data, data),
        out_shardings=(state_sh, sh.replicated(MESH)),
        donate_argnums=(0,),
    )
    return StepFn(fn, state_sh, consts_sh, sh.replicated(MESH))


def _abstract_state():
    return {
        "params": {0: jax.ShapeDtypeStruct((3, 4), jnp.float32)},
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }


def _args(step: StepFn, real: bool):
    """(state, consts, hyper, batch, noise, timesteps), abstract or as numbers."""
    data = sh.batch_sharding(MESH, leading=1)
    rng = np.random.default_rng(0)
    arrays = {
        "state": {"params": {0: rng.normal(size=(3, 4))}, "step": np.int32(0)},
        "consts": {"b": rng.normal(size=(4,))},
        "batch": {"x": rng.normal(size=(1, 8, 3))},
        "noise": rng.normal(size=(1, 8, 4)),
        "t": rng.normal(size=(1, 8)),
    }
    arrays = jax.tree.map(
        lambda x: np.asarray(x, np.int32 if x.dtype == np.int32 else np.float32), arrays
    )
    hyper = {"lr": np.float32(0.1), "scale": np.float32(0.5)}
    inputs = (arrays["batch"], arrays["noise"], arrays["t"])
    if not real:
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            arrays["state"],
            step.state_shardings,
        )
        inputs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data), inputs
        )
        return (state, arrays["consts"], hyper, *inputs)
    state = jax.device_put(arrays["state"], step.state_shardings)
    consts = jax.device_put(arrays["consts"], step.const_shardings)
    return (state, consts, hyper, *jax.device_put(inputs, data))


def _run(compiled, step: StepFn):
    state, consts, hyper, *inputs = _args(step, real=True)
    leaves = jax.tree.leaves(state)
    new, metrics = compiled(state, consts, hyper, *inputs)
    assert all(x.is_deleted() for x in leaves)  # donated, as the plain step's state
    return jax.tree.map(np.asarray, (new, metrics))


def test_a_stored_program_is_compiled_without_tracing_and_computes_the_plain_step(tmp_path):
    traces = []
    step = _step(traces)
    plain = _run(step.compile(*_args(step, False)[:3], _args(step, False)[3:]), step)
    assert traces == [1]

    first_step = _step(traces)  # a new function: jax's own trace cache does not know it
    first = stored_step.compile_stored(
        first_step, _args(first_step, False), tmp_path / "steps", "k1"
    )
    assert traces == [1, 1]
    assert [p.name for p in (tmp_path / "steps").iterdir()] == ["k1.jaxexport"]
    second_step = _step(traces)
    second = stored_step.compile_stored(
        second_step, _args(second_step, False), tmp_path / "steps", "k1"
    )
    assert traces == [1, 1]  # loaded, not traced
    for compiled in (first, second):
        got = _run(compiled, step)
        jax.tree.map(np.testing.assert_array_equal, got, plain)
        assert set(got[0]["params"]) == {0} and int(got[0]["step"]) == 1


def test_a_damaged_entry_is_traced_again_and_replaced(tmp_path, capsys):
    (tmp_path / "k1.jaxexport").write_bytes(b"not a program")
    traces = []
    step = _step(traces)
    stored_step.compile_stored(step, _args(step, False), tmp_path, "k1")
    err = capsys.readouterr().err
    assert f"the stored step program {tmp_path / 'k1.jaxexport'} did not load" in err
    assert "tracing the step again" in err and traces == [1]
    again = _step(traces)
    _run(stored_step.compile_stored(again, _args(again, False), tmp_path, "k1"), again)
    assert traces == [1]  # the replacement loads
    assert [p.name for p in tmp_path.iterdir()] == ["k1.jaxexport"]  # no temporary left


def test_a_folder_that_cannot_be_written_only_warns(tmp_path, capsys):
    (tmp_path / "steps").write_text("a file where the folder should be")
    traces = []
    step = _step(traces)
    _run(stored_step.compile_stored(step, _args(step, False), tmp_path / "steps", "k1"), step)
    assert f"the step program was not stored in {tmp_path / 'steps'}" in capsys.readouterr().err


class _Net(nnx.Module):
    def __init__(self, width, remat, rngs):
        self.linear = nnx.Linear(3, width, rngs=rngs)
        self.remat = remat


def _key(**change):
    graphdef, _ = nnx.split(_Net(change.get("width", 4), change.get("remat", False), nnx.Rngs(0)))
    stage = SimpleNamespace(
        configs=change.get("configs", {"unet": {"layers": 2}}),
        schedule=SimpleNamespace(
            prediction_type="epsilon",
            alphas_cumprod=np.linspace(1.0, 0.0, 10) ** change.get("power", 1),
        ),
    )
    hyper = {"lr": np.float32(1e-4), **change.get("hyper", {})}
    args = ({"w": jax.ShapeDtypeStruct(change.get("shape", (4, 3)), jnp.float32)}, hyper)
    options = {"use_ema": change.get("use_ema", False)}
    mesh = change.get("mesh", MESH)
    return stored_step.step_key(
        stage=stage, graphdefs={"model": graphdef}, mesh=mesh, args=args, options=options
    )


def test_the_key_is_stable_and_tells_apart_what_the_trace_reads():
    base = _key()
    assert base == _key()  # no memory addresses or other per-process state in it
    changes = [
        dict(width=5),  # a network's shape
        dict(remat=True),  # a static attribute of a module
        dict(configs={"unet": {"layers": 3}}),
        dict(power=2),  # the noise schedule
        dict(hyper={"snr_gamma": np.float32(5.0)}),  # a new hyperparameter key: a new program
        dict(shape=(8, 3)),
        dict(use_ema=True),
        dict(mesh=sh.make_mesh("data=8,fsdp=1")),
    ]
    keys = [_key(**c) for c in changes]
    assert base not in keys and len(set(keys)) == len(keys)


def test_the_key_ignores_hyperparameter_values():
    assert _key(hyper={"snr_gamma": np.float32(5.0)}) == _key(hyper={"snr_gamma": np.float32(1.0)})


@pytest.mark.parametrize("flag", ["XLA_FLAGS", "LIBTPU_INIT_ARGS"])
def test_the_key_follows_xla_flags(monkeypatch, flag):
    base = _key()
    monkeypatch.setenv(flag, "--xla_some_flag=1")
    assert _key() != base
