"""The reference's final output: a diffusers pipeline folder in output_dir."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    UnCLIPScheduler,
)
from transformers import CLIPImageProcessorPil

from kandinsky_common.folders import write_decoder_readme
from torch_kandinsky.stages import load_frozen

# The pipeline components each stage takes over from its pretrained folders, never trained.
FROZEN_PARTS = {"prior": ("text_encoder", "image_encoder"), "decoder": ("movq",)}


def image_processor(prior_folder) -> CLIPImageProcessorPil:
    # The PIL processor: transformers' default one needs torchvision, which we do not install.
    return CLIPImageProcessorPil.from_pretrained(prior_folder, subfolder="image_processor")


def trained_pipeline(stage, model, frozen: dict | None = None):
    """The stage's own pipeline, with the trained network in place of the pretrained one and the
    stage's frozen parts, or those of `frozen` (name -> module)."""
    parts = {name: getattr(stage, name) for name in FROZEN_PARTS[stage.spec.name]}
    parts.update(frozen or {})
    if stage.spec.name == "prior":
        return KandinskyV22PriorPipeline(
            prior=model,
            tokenizer=stage.tokenizer,
            scheduler=UnCLIPScheduler.from_pretrained(stage.folder, subfolder="scheduler"),
            image_processor=image_processor(stage.folder),
            **parts,
        )
    return KandinskyV22Pipeline(
        unet=model,
        scheduler=DDPMScheduler.from_pretrained(stage.folder, subfolder="scheduler"),
        **parts,
    )


def float32_parts(stage) -> dict:
    """The stage's frozen parts in float32 for an export.

    --mixed_precision loads them in bf16/fp16 for training; exported so beside the fp32 trained
    network, the folder would not load without `torch_dtype` (mixed dtypes in one pipeline), and
    casting back would write rounded weights. So those are read again from the pretrained folder,
    on the CPU; parts already in float32 are used as they are.
    """
    parts = {}
    for name in FROZEN_PARTS[stage.spec.name]:
        module = getattr(stage, name)
        if module.dtype != torch.float32:  # the pipeline subfolder is named as the attribute
            module = load_frozen(type(module), stage.folder, name, "cpu", torch.float32)
        parts[name] = module
    return parts


def export_pipeline(stage, model, output_dir: str) -> Path:
    """Prior: KandinskyV22PriorPipeline folder. Decoder: KandinskyV22Pipeline folder with a
    README.md naming the prior, so AutoPipelineForText2Image builds the combined pipeline."""
    out = Path(output_dir)
    trained_pipeline(stage, model, float32_parts(stage)).save_pretrained(out)
    if stage.spec.name == "decoder":
        prior = str(stage.prior_folder.resolve())
        write_decoder_readme(out, prior=prior, base_model=str(stage.folder))
    return out


def export_checkpoint(checkpoint, output_dir, use_ema: bool = True) -> Path:
    """The pipeline folder of a torch checkpoint: its `<model>_ema/` (when present and `use_ema`)
    or `<model>/` weights with the frozen parts from the pretrained folders of its run."""
    from kandinsky_common.checkpoints import read_state
    from kandinsky_common.errors import UserError
    from kandinsky_common.flags import TrainConfig
    from torch_kandinsky.training.loop import make_stage

    checkpoint, out = Path(checkpoint), Path(output_dir)
    meta = read_state(checkpoint)
    if "config" not in meta:
        raise UserError(f"{checkpoint} predates checkpoints that record their run; export needs it")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty; pass a new folder")
    cfg = TrainConfig(**meta["config"])
    stage = make_stage(cfg, meta["stage"], torch.device("cpu"), torch.float32)
    sub = stage.spec.model_subfolder
    model = type(stage.model).from_pretrained(checkpoint / sub)
    ema = checkpoint / f"{sub}_ema"
    if use_ema and ema.is_dir():
        # Only the weights: the EMA folder's config also holds EMAModel's own state (decay,
        # optimization_step, ...), which the network's class does not take.
        model.load_state_dict(_ema_weights(checkpoint, ema))
    return export_pipeline(stage, model, out)


def _ema_weights(checkpoint: Path, folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from torch_kandinsky.checkpoint import CheckpointDamaged

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
