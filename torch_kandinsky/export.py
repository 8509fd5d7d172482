"""The reference's final output: a diffusers pipeline folder in output_dir."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    DDPMScheduler,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    UnCLIPScheduler,
)
from transformers import CLIPImageProcessorPil

from kandinsky_common.folders import write_decoder_readme


def image_processor(prior_folder) -> CLIPImageProcessorPil:
    # The PIL processor: transformers' default one needs torchvision, which we do not install.
    return CLIPImageProcessorPil.from_pretrained(prior_folder, subfolder="image_processor")


def trained_pipeline(stage, model):
    """The stage's own pipeline, with the trained network in place of the pretrained one."""
    if stage.spec.name == "prior":
        return KandinskyV22PriorPipeline(
            prior=model,
            image_encoder=stage.image_encoder,
            text_encoder=stage.text_encoder,
            tokenizer=stage.tokenizer,
            scheduler=UnCLIPScheduler.from_pretrained(stage.folder, subfolder="scheduler"),
            image_processor=image_processor(stage.folder),
        )
    return KandinskyV22Pipeline(
        unet=model,
        scheduler=DDPMScheduler.from_pretrained(stage.folder, subfolder="scheduler"),
        movq=stage.movq,
    )


def export_pipeline(stage, model, output_dir: str) -> Path:
    """Prior: KandinskyV22PriorPipeline folder. Decoder: KandinskyV22Pipeline folder with a
    README.md naming the prior, so AutoPipelineForText2Image builds the combined pipeline."""
    out = Path(output_dir)
    trained_pipeline(stage, model).save_pretrained(out)
    if stage.spec.name == "decoder":
        prior = str(stage.prior_folder.resolve())
        write_decoder_readme(out, prior=prior, base_model=str(stage.folder))
    return out


def export_checkpoint(checkpoint, output_dir, use_ema: bool = True) -> Path:
    """The pipeline folder of a torch checkpoint: its `<model>_ema/` (when present and `use_ema`)
    or `<model>/` weights with the frozen parts from the pretrained folders of its run."""
    import torch

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
    source = checkpoint / f"{sub}_ema" if use_ema and (checkpoint / f"{sub}_ema").is_dir() else None
    model = type(stage.model).from_pretrained(source or checkpoint / sub)
    return export_pipeline(stage, model, out)
