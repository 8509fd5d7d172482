"""Resumable checkpoints of the torch backend: accelerate state + model folder + data position."""

from __future__ import annotations

import shutil
from pathlib import Path

from kandinsky_common import checkpoints as ck


def save(
    accelerator, output_dir, step: int, model, stage_spec, state: dict, limit=None, ema=None
) -> Path:
    """Every process calls this (accelerate writes per-process RNG files); main renames."""
    tmp = ck.temp_dir(output_dir, step)
    if accelerator.is_main_process:
        ck.prune(output_dir, limit)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / stage_spec.model_subfolder)
        if ema is not None:  # as the reference: <model>_ema/, loadable by from_pretrained
            ema.save_pretrained(str(tmp / f"{stage_spec.model_subfolder}_ema"))
        ck.write_state(tmp, state)
        ck.finalize(tmp, ck.checkpoint_dir(output_dir, step))
    accelerator.wait_for_everyone()
    return ck.checkpoint_dir(output_dir, step)


def load(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return ck.read_state(path)
