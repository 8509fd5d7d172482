"""A torch training checkpoint read back as the pipeline folder of its stage (the loop's final
export is the same `Stage.export`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kandinsky_common.checkpoints import read_state
from kandinsky_common.errors import CheckpointDamaged, UserError
from kandinsky_common.flags import config_from_record
from kandinsky_common.lora import read_adapter
from torch_kandinsky import lora as lora_ops
from torch_kandinsky.stages import make_stage


def export_checkpoint(checkpoint, output_dir, use_ema: bool = True) -> Path:
    """The pipeline folder of a torch checkpoint: its `<model>_ema/` (when present and `use_ema`)
    or `<model>/` weights with the frozen parts from the pretrained folders of its run."""
    checkpoint, out = Path(checkpoint), Path(output_dir)
    meta = read_state(checkpoint)
    if "config" not in meta:
        raise UserError(f"{checkpoint} predates checkpoints that record their run; export needs it")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty; pass a new folder")
    cfg = config_from_record(meta["config"])
    stage = make_stage(cfg, meta["stage"], torch.device("cpu"), torch.float32)
    if stage.lora is not None:  # the checkpoint holds the adapter as the export writes it
        tensors, _ = read_adapter(checkpoint, stage.lora.prefix)
        lora_ops.from_peft(stage.model, tensors)
        return stage.export(stage.model, out)
    sub = stage.spec.model_subfolder
    model = type(stage.model).from_pretrained(checkpoint / sub)
    ema = checkpoint / f"{sub}_ema"
    if use_ema and ema.is_dir():
        # Only the weights: the EMA folder's config also holds EMAModel's own state (decay,
        # optimization_step, ...), which the network's class does not take.
        model.load_state_dict(_ema_weights(checkpoint, ema))
    return stage.export(model, out)


def _ema_weights(checkpoint: Path, folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))  # one file, or the shards of a large model
    if not files:
        raise CheckpointDamaged(checkpoint, f"{folder.name}/ holds no weights")
    weights = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type for a truncated file
            raise CheckpointDamaged(checkpoint, f"{folder.name}/{f.name} is unreadable") from e
    return weights
