"""The compiled step stored between runs (flax_kandinsky.training.executables): a stored entry
is loaded instead of compiled, a damaged one is compiled again and replaced, and the key tells
apart everything the trace reads."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_kandinsky.training import executables

ONE = jax.devices()[:1]  # the toy program runs on the default device


def _compiler(calls: list):
    def compile_fn():
        calls.append(1)
        return (
            jax.jit(lambda x, y: (x * 2.0 + y, {"sum": jnp.sum(x)}))
            .lower(jnp.ones((4, 3)), jnp.float32(1.0))
            .compile()
        )

    return compile_fn


def _check(compiled):
    out, aux = compiled(jnp.arange(12.0).reshape(4, 3), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(out), np.arange(12.0).reshape(4, 3) * 2 + 1)
    assert float(aux["sum"]) == 66.0


def test_stored_step_is_loaded_not_compiled(tmp_path):
    calls = []
    first = executables.load_or_compile(_compiler(calls), tmp_path / "steps", "k1", ONE)
    _check(first)
    assert calls == [1] and [p.name for p in (tmp_path / "steps").iterdir()] == ["k1.step"]

    def refuse():
        raise AssertionError("compiled although an entry was stored")

    _check(executables.load_or_compile(refuse, tmp_path / "steps", "k1", ONE))


def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path, capsys):
    (tmp_path / "k1.step").write_bytes(b"not an executable")
    calls = []
    _check(executables.load_or_compile(_compiler(calls), tmp_path, "k1", ONE))
    assert calls == [1]
    err = capsys.readouterr().err
    assert f"the stored compiled step {tmp_path / 'k1.step'} did not load" in err
    assert "compiling it again" in err
    _check(executables.load_or_compile(_compiler(calls), tmp_path, "k1", ONE))
    assert calls == [1]  # the replacement loads


def test_no_folder_compiles_and_stores_nothing(tmp_path):
    calls = []
    _check(executables.load_or_compile(_compiler(calls), None, "k1", ONE))
    assert calls == [1] and list(tmp_path.iterdir()) == []


class _Net(nnx.Module):
    def __init__(self, width, remat, rngs):
        self.linear = nnx.Linear(3, width, rngs=rngs)
        self.remat = remat


def _key(**change):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
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
    return executables.step_key(
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
