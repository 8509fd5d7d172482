"""flax_kandinsky.checkpoint: orbax round trips across meshes, pruning, crashes, damage."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from flax_kandinsky.checkpoint import CheckpointDamaged, CheckpointStore, read_meta, resolve_resume
from kandinsky_common import checkpoints as ck
from kandinsky_common.errors import UserError

STAGE = "prior"


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    assert jax.device_count() == 8, "the root conftest.py should give 8 fake CPU devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))


def make_state(seed: int, shard) -> dict:
    """A train-state-like tree; `shard(spec)` gives the sharding of a leaf with that spec."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    # 8 KB arrays: orbax stores values under 1 KB inline in its index, not as array files.
    return {
        "params": {
            "kernel": jax.device_put(jax.random.normal(k1, (512, 256)), shard(P("fsdp"))),
            "bias": jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), shard(P())),
        },
        "opt": {"mu": jax.device_put(jax.random.normal(k2, (512, 256)), shard(P(None, "fsdp")))},
        "step": jax.device_put(jnp.int32(seed), shard(P())),
    }


def on_mesh(mesh):
    return lambda spec: NamedSharding(mesh, spec)


def one_device(_spec):
    return SingleDeviceSharding(jax.devices()[0])


def abstract(state) -> dict:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )


def meta(step: int, **extra) -> dict:
    return {
        "global_step": step,
        "stage": STAGE,
        "seed": 3,
        "data": {"epoch": 0, "step": step},
        **extra,
    }


def assert_same(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for r, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert r.dtype == e.dtype
        assert r.sharding.is_equivalent_to(e.sharding, r.ndim)
        np.testing.assert_array_equal(np.asarray(r), np.asarray(e))


def saved_store(out: Path, steps, shard, max_to_keep=None) -> dict:
    """Save `make_state(step)` for each step, wait, close; return the states by step."""
    states = {}
    with CheckpointStore(out, max_to_keep) as store:
        for s in steps:
            states[s] = make_state(s, shard)
            store.save(s, states[s], meta(s))
    return states


def biggest_array_file(ckpt: Path) -> Path:
    return max((ckpt / "state").rglob("ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)


def test_round_trip_values_dtypes_shardings_and_meta(tmp_path, mesh):
    config = {"learning_rate": 1e-4, "resolution": [64, 64], "use_ema": True, "name": None}
    state = make_state(1, on_mesh(mesh))
    with CheckpointStore(tmp_path, max_to_keep=None) as store:
        store.save(5, state, meta(5, config=config))
        store.wait()
        assert store.latest_step() == 5
        assert (tmp_path / "checkpoint-5" / "state").is_dir()
        restored, got = store.restore(5, abstract(state), stage=STAGE)
    assert_same(restored, state)
    assert got == {**meta(5, config=config), "backend": "flax"}
    assert read_meta(tmp_path / "checkpoint-5") == got
    assert ck.read_state(tmp_path / "checkpoint-5") == got  # the backend-generic reader agrees


def test_restores_the_layout_before_pure_dicts(tmp_path, mesh):
    """Checkpoints written while the state held nnx Variables store each of those arrays under
    a trailing `.value`; they restore into today's pure-dict state."""
    state = make_state(2, on_mesh(mesh))
    wrap = lambda x: {"value": x}  # noqa: E731
    old = {"params": jax.tree.map(wrap, state["params"]), "opt": {"mu": wrap(state["opt"]["mu"])}}
    with CheckpointStore(tmp_path, max_to_keep=None) as store:
        store.save(3, {**old, "step": state["step"]}, meta(3))
        store.wait()
        restored, _ = store.restore(3, abstract(state), stage=STAGE)
        assert_same(restored, state)
        bigger = {**abstract(state), "extra": abstract(state)["step"]}
        with pytest.raises(UserError, match="not in the checkpoint: extra"):
            store.restore(3, bigger, stage=STAGE)


def test_flax_train_state_with_optax_round_trip(tmp_path, mesh):
    """What the loop saves: a flax TrainState (static apply_fn, tx) holding optax namedtuples."""
    params = make_state(4, on_mesh(mesh))["params"]
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adamw(1e-3))
    state = state.replace(step=jnp.int32(12))
    with CheckpointStore(tmp_path, None) as store:
        store.save(12, state, meta(12))
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device(0)), state
    )
    restored, _ = CheckpointStore(tmp_path, None).restore(12, target, stage=STAGE)
    assert isinstance(restored, TrainState) and restored.tx is state.tx
    assert int(restored.step) == 12
    for r, e in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(e))


def test_restore_across_device_counts(tmp_path, mesh):
    """Written on 8 devices, read onto 1; written on 1, read onto a 4x2 mesh with fsdp sharding."""
    on8 = saved_store(tmp_path / "eight", [1], on_mesh(mesh))[1]
    on1 = saved_store(tmp_path / "one", [1], one_device)[1]
    store8, store1 = (
        CheckpointStore(tmp_path / "eight", None),
        CheckpointStore(tmp_path / "one", None),
    )

    restored, _ = store8.restore(1, abstract(on1))
    assert_same(restored, on1)  # same values (seed 1), single-device shardings
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(restored))

    restored, _ = store1.restore(tmp_path / "one" / "checkpoint-1", abstract(on8))
    assert_same(restored, on8)
    kernel = restored["params"]["kernel"]
    assert kernel.sharding.spec == P("fsdp") and len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (256, 256)


def test_max_to_keep_prunes_oldest(tmp_path, mesh):
    saved_store(tmp_path, [1, 2, 3, 4], on_mesh(mesh), max_to_keep=2)
    assert CheckpointStore(tmp_path, 2).steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(UserError, match="keep at least 1"):
        CheckpointStore(tmp_path, 0)


def test_async_save_survives_donated_buffers(tmp_path, mesh):
    """save() returns before the files exist; the caller may free the arrays right away."""
    state = make_state(2, on_mesh(mesh))
    expected = jax.tree.map(np.asarray, state)
    store = CheckpointStore(tmp_path, None, async_save=True)
    store.save(1, state, meta(1))
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what donating the state to the next train step does
    store.wait()
    assert store.latest_step() == 1
    restored, _ = store.restore(1, abstract(make_state(0, on_mesh(mesh))))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), expected)
    store.save(1, restored, meta(1))  # the same step again (final save == preemption save): no-op
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.save(2, restored, meta(2))


def test_latest_ignores_uncommitted_step(tmp_path, mesh):
    """A run killed mid-write leaves checkpoint-N.orbax-checkpoint-tmp: never resumed from."""
    states = saved_store(tmp_path, [2], on_mesh(mesh))
    # Everything is in the tmp folder, as when the kill came just before orbax's final rename.
    tmp = tmp_path / "checkpoint-7.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoint-2", tmp)

    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    store = CheckpointStore(tmp_path, None)
    assert store.steps() == [2]
    state, got = store.resume("latest", abstract(states[2]), stage=STAGE)
    assert got["global_step"] == 2
    with pytest.raises(UserError, match="incomplete .*still writing it"):
        resolve_resume(tmp_path, str(tmp))

    store.save(3, state, meta(3))  # the first save clears what the killed run left behind
    store.close()
    assert not tmp.exists()
    assert CheckpointStore(tmp_path, None).steps() == [2, 3]


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate", r"array \S+ cannot be read"),
        ("delete_array", r"array \S+ cannot be read"),
        ("delete_meta", r"meta/training_state\.json is missing"),
        ("delete_state", r"state/ is missing"),
        ("delete_manifest", r"state/ metadata"),
    ],
)
def test_damaged_checkpoint_is_a_user_error(tmp_path, mesh, damage, match):
    states = saved_store(tmp_path, [1], on_mesh(mesh))
    c = tmp_path / "checkpoint-1"
    if damage == "truncate":
        f = biggest_array_file(c)
        os.truncate(f, f.stat().st_size // 2)
    elif damage == "delete_array":
        biggest_array_file(c).unlink()
    elif damage == "delete_meta":
        (c / "meta" / "training_state.json").unlink()
    elif damage == "delete_state":
        shutil.rmtree(c / "state")
    else:
        (c / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointDamaged, match=match) as info:
        CheckpointStore(tmp_path, None).restore(c, abstract(states[1]), stage=STAGE)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "checkpoint-1 is damaged" in message
    assert "\n" not in message and len(message) < 600  # one line, no tensorstore spec dump


def test_restore_latest_good_falls_back_with_a_warning(tmp_path, mesh, caplog):
    states = saved_store(tmp_path, [1, 2], on_mesh(mesh))
    f = biggest_array_file(tmp_path / "checkpoint-2")
    os.truncate(f, 100)
    store = CheckpointStore(tmp_path, None)

    with caplog.at_level(logging.WARNING, logger="flax_kandinsky.checkpoint"):
        restored, got = store.resume("latest", abstract(states[1]), stage=STAGE)
    assert got["global_step"] == 1
    assert_same(restored, states[1])
    assert any(
        "checkpoint-2 is damaged" in r.getMessage() and "trying checkpoint-1" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(CheckpointDamaged):  # asked for explicitly: no silent substitute
        store.resume("checkpoint-2", abstract(states[1]), stage=STAGE)

    (tmp_path / "checkpoint-1" / "meta" / "training_state.json").unlink()
    with pytest.raises(UserError, match="every checkpoint .* is damaged"):
        store.restore_latest_good(abstract(states[1]), stage=STAGE)

    # Resuming from step 1 and training on writes step 2 again: the damaged one is replaced.
    shutil.rmtree(tmp_path / "checkpoint-1")
    saved_store(tmp_path, [1], on_mesh(mesh))
    with caplog.at_level(logging.WARNING, logger="flax_kandinsky.checkpoint"):
        saved_store(tmp_path, [2], on_mesh(mesh))
    assert any("replacing" in r.getMessage() for r in caplog.records)
    restored, got = store.resume("latest", abstract(states[2]), stage=STAGE)
    assert got["global_step"] == 2
    assert_same(restored, states[2])


def test_resolve_resume_semantics(tmp_path, mesh):
    out = tmp_path / "out"
    assert resolve_resume(out, None) is None
    assert resolve_resume(out, "latest") is None  # no output_dir yet: fresh start
    with pytest.raises(UserError, match="no such checkpoint; pass 'latest' or one of none"):
        resolve_resume(out, "checkpoint-9")
    assert CheckpointStore(out, None).restore_latest_good({}) is None
    assert not out.exists()  # a store that only looked has created nothing

    saved_store(out, [1, 3], on_mesh(mesh))
    assert resolve_resume(out, "latest") == out / "checkpoint-3"
    assert resolve_resume(out, "checkpoint-1") == out / "checkpoint-1"  # a name inside output_dir
    assert resolve_resume(out, str(out / "checkpoint-1")) == out / "checkpoint-1"
    with pytest.raises(UserError, match=r"no such checkpoint.*checkpoint-1', 'checkpoint-3"):
        resolve_resume(out, str(tmp_path / "elsewhere" / "checkpoint-2"))
    (out / "checkpoint-4").mkdir()  # a folder that never held a checkpoint
    with pytest.raises(UserError, match="incomplete .*no state/ or meta/"):
        resolve_resume(out, "checkpoint-4")
    assert resolve_resume(out, "latest") == out / "checkpoint-3"
    # The torch backend's rule is unchanged: it does not take flax checkpoints for its own.
    assert ck.resolve_resume(out, "latest") is None


def test_stage_backend_and_shape_mismatches(tmp_path, mesh):
    states = saved_store(tmp_path, [1], on_mesh(mesh))
    store = CheckpointStore(tmp_path, None)
    target = abstract(states[1])
    with pytest.raises(UserError, match="from the prior stage; this is the decoder stage"):
        store.restore(1, target, stage="decoder")

    bigger = jax.tree.map(lambda a: a, target)
    bigger["params"]["kernel"] = jax.ShapeDtypeStruct(
        (128, 32), jnp.float32, sharding=one_device(0)
    )
    bigger["ema"] = {"kernel": target["params"]["kernel"]}
    with pytest.raises(UserError, match="does not fit") as info:
        store.restore(1, bigger, stage=STAGE)
    assert not isinstance(info.value, CheckpointDamaged)  # the flags, not the files: no fallback
    assert "not in the checkpoint: ema.kernel" in str(info.value)
    assert "params.kernel has shape (512, 256) there, (128, 32) here" in str(info.value)

    # A torch checkpoint in the same output_dir: named by check_compatible, never touched by orbax.
    torch_ckpt = tmp_path / "checkpoint-2"
    torch_ckpt.mkdir()
    ck.write_state(torch_ckpt, {"global_step": 2, "stage": STAGE, "backend": "torch"})
    assert store.steps() == [1]
    with pytest.raises(
        UserError, match="written by the torch backend; resume it with --backend torch"
    ):
        store.resume("latest", target, stage=STAGE)
    with pytest.raises(UserError, match="not a flax checkpoint"):
        saved_store(tmp_path, [2], on_mesh(mesh))
    assert (torch_ckpt / ck.STATE_FILE).is_file()


_TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from flax_kandinsky.checkpoint import CheckpointStore

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
full = np.arange(512 * 256, dtype=np.float32).reshape(512, 256)
state = {"w": jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("fsdp")),
                                           lambda idx: full[idx])}
with CheckpointStore(sys.argv[3], max_to_keep=2) as store:
    for step in (1, 2, 3):
        store.save(step, state, {"stage": "prior", "global_step": step})
target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
restored, meta = CheckpointStore(sys.argv[3], 2).resume("latest", target, stage="prior")
assert meta["global_step"] == 3, meta
for shard in restored["w"].addressable_shards:
    assert np.array_equal(np.asarray(shard.data), full[shard.index])
print("ok")
"""


def test_two_processes_save_and_restore(tmp_path):
    """Two jax processes (4 CPU devices each) write one checkpoint together and read it back."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    worker = tmp_path / "worker.py"
    worker.write_text(_TWO_PROCESS_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), address, str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0 and stdout.split()[-1:] == ["ok"], stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert {p.name for p in (out / "checkpoint-3" / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }


def test_a_read_failure_that_is_not_damage_is_not_called_damaged(tmp_path, mesh, monkeypatch):
    """Out of memory, a wrong argument, a bug: raised as they are, the checkpoint left alone."""
    states = saved_store(tmp_path, [1], on_mesh(mesh))
    store = CheckpointStore(tmp_path, None)

    def fails(*a, **k):
        raise ValueError("Checkpoint path should be absolute. Got rel/checkpoint-1")

    monkeypatch.setattr(store._get_reader(), "restore", fails)
    with pytest.raises(ValueError, match="should be absolute") as info:
        store.restore(tmp_path / "checkpoint-1", abstract(states[1]), stage=STAGE)
    assert not isinstance(info.value, CheckpointDamaged)


def test_relative_paths_restore(tmp_path, mesh, monkeypatch):
    states = saved_store(tmp_path / "run", [1], on_mesh(mesh))
    monkeypatch.chdir(tmp_path)
    state, meta = CheckpointStore("run", None).restore(
        "run/checkpoint-1", abstract(states[1]), stage=STAGE
    )
    assert meta["global_step"] == 1
