"""A flax training checkpoint read back: its pipeline folder (the loop's final export is the
same `Stage.export`), or its trained weights for sampling."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from flax_kandinsky.checkpoint import CheckpointStore, read_meta
from flax_kandinsky.stages import make_stage
from flax_kandinsky.training.optim import make_optimizer
from flax_kandinsky.training.step import init_state, split_stage
from kandinsky_common.errors import UserError
from kandinsky_common.flags import config_from_record
from kandinsky_common.storage import location


def load_checkpoint_model(checkpoint: str | Path, use_ema: bool = True):
    """(stage, model) with the checkpoint's trained weights (its EMA weights when it has them and
    `use_ema`), built from the pretrained folders named in the checkpoint's own config."""
    checkpoint = location(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"--checkpoint {checkpoint} is not a folder")
    meta = read_meta(checkpoint)
    if "config" not in meta:
        raise UserError(f"{checkpoint} predates checkpoints that record their run; export needs it")
    cfg = config_from_record(meta["config"])
    stage = make_stage(cfg, meta["stage"])
    _, params, _ = split_stage(stage)
    tx = make_optimizer(cfg, max(int(meta["global_step"]), 1))
    abstract = jax.eval_shape(lambda p: init_state(p, tx, bool(meta.get("use_ema"))), params)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    with CheckpointStore(checkpoint.parent, None) as store:
        state, _ = store.restore(checkpoint, target, stage=meta["stage"])
    nnx.update(stage.model, state["ema"] if use_ema and "ema" in state else state["params"])
    return stage, stage.model


def checkpoint_params(checkpoint: str | Path, use_ema: bool = True) -> tuple[str, dict]:
    """(stage name, the network's params as a pure dict of arrays) of a flax training checkpoint
    folder (checkpoint-N): the EMA weights when the run kept them and `use_ema`, else the live
    ones; a LoRA run's adapter folded into its base."""
    stage, model = load_checkpoint_model(checkpoint, use_ema)
    trained = nnx.to_pure_dict(nnx.split(model, stage.trainable, ...)[1])
    return stage.spec.name, stage.sampling_params(trained)


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, use_ema: bool = True) -> Path:
    """Write the prior or decoder pipeline folder of a flax checkpoint to `output_dir`."""
    stage, model = load_checkpoint_model(checkpoint, use_ema)
    out = location(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty; pass a new folder")
    return stage.export(model, out)
