"""Randomly initialised Kandinsky 2.2 prior and decoder folders, written by diffusers itself.

The folders have the layout of kandinsky-community/kandinsky-2-2-{prior,decoder}
at the "tiny" or "small" sizes of kandinsky_common.model_configs, so every loader of the project can
be tested against what `save_pretrained` really writes, without the hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from kandinsky_common.errors import UserError
from kandinsky_common.folders import write_decoder_readme
from kandinsky_common.model_configs import get_configs
from kandinsky_fixtures.clip_vocab import make_clip_tokenizer, write_vocab_files

FIXTURE_SIZES = ("tiny", "small")


def make_image_processor(config: dict):
    """The CLIP image processor of the prior folder, usable without torchvision.

    transformers 5 has two CLIP image processors: `CLIPImageProcessor` (resizes with torchvision)
    and `CLIPImageProcessorPil` (PIL + numpy). Without torchvision, `CLIPImageProcessor` is an
    alias that warns and falls back to the PIL class, and diffusers' KandinskyV22PriorPipeline
    annotates its `image_processor` with whichever class that import resolved to. Building the PIL
    class directly gives the same object without the warning; the saved files are then renamed to
    `CLIPImageProcessor` (see `_use_portable_processor_name`) so the folder matches the published
    one and loads on machines with torchvision too.
    """
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**config)


def _use_portable_processor_name(prior_dir: Path) -> None:
    # The published prior names the class "CLIPImageProcessor"; loading resolves that name to the
    # PIL backend here and to the torchvision backend where torchvision exists, both of which
    # diffusers accepts. "CLIPImageProcessorPil" would force the PIL class everywhere and differ
    # from the real folders our loaders must handle.
    index_path = prior_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    proc_path = prior_dir / "image_processor" / "preprocessor_config.json"
    proc = json.loads(proc_path.read_text())
    proc["image_processor_type"] = "CLIPImageProcessor"
    proc_path.write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")


def build_prior_pipeline(size: str = "tiny", seed: int = 0) -> KandinskyV22PriorPipeline:
    """A KandinskyV22PriorPipeline with random weights drawn after `torch.manual_seed(seed)`."""
    cfg = get_configs(size)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"]))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    prior = PriorTransformer(**cfg["prior"])
    # The class initialises clip_mean/clip_std to zeros, i.e. image_embeds = 0 after the prior and
    # a division by zero in the prior's training target; real checkpoints hold CLIP statistics.
    dim = prior.clip_mean.shape[-1]
    with torch.no_grad():
        prior.clip_mean.copy_(0.1 * torch.randn(1, dim))
        prior.clip_std.copy_(0.5 + torch.rand(1, dim))
    scheduler_cfg = {k: v for k, v in cfg["prior_scheduler"].items() if k != "_class_name"}
    pipe = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=make_clip_tokenizer(),
        scheduler=UnCLIPScheduler(**scheduler_cfg),
        image_processor=make_image_processor(cfg["image_processor"]),
    )
    return pipe


def build_decoder_pipeline(size: str = "tiny", seed: int = 0) -> KandinskyV22Pipeline:
    """A KandinskyV22Pipeline with random weights drawn after `torch.manual_seed(seed)`."""
    cfg = get_configs(size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    movq = VQModel(**cfg["movq"])
    scheduler_cfg = {k: v for k, v in cfg["decoder_scheduler"].items() if k != "_class_name"}
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(**scheduler_cfg), movq=movq)


def build_kandinsky_folders(
    out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0
) -> tuple[Path, Path]:
    """Write `out_dir/prior` and `out_dir/decoder` (safetensors) and return both paths.

    The decoder README names the prior by absolute path: diffusers resolves it against the working
    directory, not the decoder folder, when AutoPipelineForText2Image builds the combined pipeline.
    """
    if size not in FIXTURE_SIZES:
        raise ValueError(f"unknown fixture size {size!r}; one of {FIXTURE_SIZES}")
    out = Path(out_dir).resolve()
    prior_dir, decoder_dir = out / "prior", out / "decoder"
    for d in (prior_dir, decoder_dir):
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise UserError(f"{d} already exists and is not empty; pass a new --out folder")
    build_prior_pipeline(size, seed).save_pretrained(prior_dir, safe_serialization=True)
    build_decoder_pipeline(size, seed).save_pretrained(decoder_dir, safe_serialization=True)
    _use_portable_processor_name(prior_dir)
    # The published tokenizer folder also carries vocab.json/merges.txt, which older transformers
    # releases and non-HF tokenizers read instead of tokenizer.json.
    write_vocab_files(prior_dir / "tokenizer")
    write_decoder_readme(
        decoder_dir, prior=str(prior_dir), base_model=f"random-kandinsky-2-2-{size}-seed{seed}"
    )
    return prior_dir, decoder_dir
