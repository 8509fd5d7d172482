"""Training trajectories: the torch and flax backends, run through their real loops with the same
flags, data order, noise and timesteps, follow the same losses and end at the same weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from kandinsky_common.flags import parse_config
from parity_tests.conftest import rel_l2
from tests.helpers import train_args

UPDATES = 20


def _run(backend, stage, tiny_folders, data, out, lora=False, **flags):
    import importlib

    prior, decoder = tiny_folders
    args = train_args(prior, decoder, data, out, backend=backend, **flags)
    cfg = parse_config(args, stage, lora)
    loop = importlib.import_module(f"{backend}_kandinsky.training.loop")
    return loop.train(cfg, stage)


# Twenty updates exercising every part of an update: accumulation, warm-up then cosine, clipping
# small enough to act on most updates, and weight decay.
FLAGS = dict(
    max_train_steps=UPDATES,
    gradient_accumulation_steps=2,
    lr_scheduler="cosine",
    lr_warmup_steps=5,
    max_grad_norm=0.05,
    adam_weight_decay=1e-2,
    checkpointing_steps=UPDATES,
    report_to="none",
)


def run_both(stage, tiny_folders, data, tmp_path, tol, lora=False, **flags):
    """Both backends through their real loops (output in tmp_path/t and /f) with the same global
    batch (torch one process x 8, flax 8 devices x 1, or 1 x 8 on one device); their per-update
    losses agree within the trajectory tolerance."""
    flags = {**FLAGS, **flags}
    common = (stage, tiny_folders, data)
    t = _run("torch", *common, tmp_path / "t", lora, train_batch_size=8, **flags)
    f = _run(
        "flax", *common, tmp_path / "f", lora, train_batch_size=8 // jax.device_count(), **flags
    )
    lt, lf = np.asarray(t["losses"]), np.asarray(f["losses"])
    assert lt.shape == lf.shape == (UPDATES,)
    worst = float(np.max(np.abs(lf - lt) / np.abs(lt)))
    assert worst <= tol["trajectory_loss"], worst


def _weights(folder, sub):
    return load_file(folder / sub / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_twenty_updates_match(stage, tiny_folders, sample_dataset, tmp_path, tol):
    flags = {**FLAGS, "learning_rate": 5e-4, "use_ema": True}
    run_both(stage, tiny_folders, sample_dataset, tmp_path, tol, **flags)

    sub = "prior" if stage == "prior" else "unet"
    # Exported weights are the EMA weights on both sides.
    et, ef = _weights(tmp_path / "t", sub), _weights(tmp_path / "f", sub)
    keys = sorted(et)
    assert keys == sorted(ef)
    flat = lambda d: np.concatenate([d[k].ravel() for k in keys])  # noqa: E731
    assert rel_l2(flat(ef), flat(et)) <= tol["trajectory_params"]
    # Live (non-EMA) params: torch's checkpoint holds them as a diffusers folder, flax's as state.
    pt = _weights(tmp_path / "t" / f"checkpoint-{UPDATES}", sub)
    pf = _flax_checkpoint_params(stage, tiny_folders, tmp_path / "f", flags)
    keys = sorted(k for k in pt if k not in ("clip_mean", "clip_std"))
    got, ref = flat({k: pf[k] for k in keys}), flat({k: pt[k] for k in keys})
    assert rel_l2(got, ref) <= tol["trajectory_params"]
    ema = flat({k: et[k] for k in keys})
    assert np.abs(ema - ref).max() > 0  # EMA and live weights differ: both were compared


def _flax_checkpoint_params(stage, tiny_folders, out, flags):
    """The live params of the flax run's last checkpoint, in torch layout."""
    from flax_kandinsky.checkpoint import CheckpointStore
    from flax_kandinsky.convert import flatten
    from flax_kandinsky.convert.prior import PRIOR_TABLE
    from flax_kandinsky.convert.unet import UNET_TABLE
    from flax_kandinsky.stages import make_stage
    from flax_kandinsky.training.optim import make_optimizer
    from flax_kandinsky.training.step import init_state, split_stage

    prior, decoder = tiny_folders
    cfg = parse_config(train_args(prior, decoder, "unused", out, backend="flax", **flags), stage)
    _, params, _ = split_stage(make_stage(cfg, stage))
    tx = make_optimizer(cfg, UPDATES)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, True), params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    with CheckpointStore(out, None) as store:
        state, _ = store.restore(UPDATES, target, stage=stage)
    table = PRIOR_TABLE if stage == "prior" else UNET_TABLE
    return table.to_torch(flatten(state["params"]))


def test_resume_with_other_optimizer_flags_matches(tiny_folders, sample_dataset, tmp_path, tol):
    """Resumed with another learning rate, schedule, horizon and Adam settings, both backends
    train with the new ones from the first resumed update (accelerate restores the checkpoint's
    param groups and base LRs: torch kept the old ones, as the reference does)."""
    first = dict(max_train_steps=3, checkpointing_steps=3, report_to="none", learning_rate=1e-4)
    then = dict(
        first, resume_from_checkpoint="latest", max_train_steps=6, learning_rate=3e-4,
        lr_scheduler="cosine", lr_warmup_steps=1, adam_beta1=0.8, adam_beta2=0.99,
        adam_epsilon=1e-6, adam_weight_decay=0.1,
    )  # fmt: skip
    losses = {}
    for backend in ("torch", "flax"):
        out, data = tmp_path / backend, (tiny_folders, sample_dataset)
        batch = 8 if backend == "torch" else 8 // jax.device_count()
        _run(backend, "prior", *data, out, train_batch_size=batch, **first)
        resumed = _run(backend, "prior", *data, out, train_batch_size=batch, **then)
        losses[backend] = np.asarray(resumed["losses"])
    lt, lf = losses["torch"], losses["flax"]
    assert lt.shape == lf.shape == (3,)
    worst = float(np.max(np.abs(lf - lt) / np.abs(lt)))
    assert worst <= tol["trajectory_loss"], (worst, lt, lf)
