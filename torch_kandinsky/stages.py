"""What the two stages differ in (docs/architecture.md, "Stages"), and nothing else.

Mirrors flax_kandinsky/stages.py. A Stage loads its frozen encoders and its trainable network from
diffusers folders, encodes a numpy batch on the device (no grad), turns encoder outputs into x0,
predicts with the trainable network, names its schedule, checkpoints its network's activations,
builds its diffusers pipeline and exports it. Loop, step, optimizer and checkpoints are shared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
from torch.utils.checkpoint import checkpoint
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from kandinsky_common.errors import UserError
from kandinsky_common.flags import TrainConfig
from kandinsky_common.folders import check_pipeline_folder, read_config, write_decoder_readme
from kandinsky_common.lora import LoraSettings, write_adapter
from kandinsky_common.schedule import NoiseSchedule
from kandinsky_common.stage_spec import DECODER, PRIOR, StageSpec
from torch_kandinsky import lora as lora_ops
from torch_kandinsky.sampling import image_processor


def _load(cls, folder: Path, subfolder: str, **kw):
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{folder / subfolder} could not be loaded as {cls.__name__} ({first}); "
            "pass an intact Kandinsky 2.2 folder"
        ) from e


def load_frozen(cls, folder: Path, subfolder: str, device, dtype) -> torch.nn.Module:
    """An encoder that is never trained, loaded straight in `dtype`.

    Loading in the dtype (not `.to(dtype)` after) is what diffusers asks for: its `to()` warns on
    every cast, and would also cast the modules a model keeps in float32.
    """
    module = _load(cls, folder, subfolder, dtype=dtype)
    module.requires_grad_(False)
    return module.eval().to(device)


def _prior_folder(path) -> Path:
    return check_pipeline_folder(path, "prior", "--pretrained_prior_model_name_or_path")


def _decoder_folder(path) -> Path:
    return check_pipeline_folder(path, "decoder", "--pretrained_decoder_model_name_or_path")


def _checkpointed(block: torch.nn.Module):
    original = block.forward

    def forward(*args, **kwargs):
        if not block.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    return forward


class Stage:
    """One trainable network, its frozen encoders and its noise schedule.

    Subclasses set `folder` (the stage's pipeline folder), `prior_folder` (the prior pipeline
    folder, whose image encoder and image processor both stages use), `weight_dtype` (of the
    frozen parts) and one attribute per name in `frozen_parts`. A LoRA script's stage has `lora`
    (adapters on the model's attention projections, the only trained weights; `merge_lora`: the
    export also writes the merged pipeline folder).
    """

    spec: StageSpec
    model: torch.nn.Module  # the trainable network
    schedule: NoiseSchedule
    # the pipeline components taken over from the pretrained folders, never trained
    frozen_parts: tuple[str, ...]
    lora: LoraSettings | None = None
    merge_lora: bool = False

    def _with_lora(self, cfg: TrainConfig) -> Stage:
        """Add the adapter a LoRA script's flags ask for (drawn from --seed, 0 when unset)."""
        lora = LoraSettings.from_config(cfg, self.spec)
        if lora is not None:
            self.use_lora(lora, cfg.seed or 0, cfg.merge_lora)
        return self

    def use_lora(self, lora: LoraSettings, seed: int = 0, merge: bool = False) -> None:
        """Train an adapter on the model's attention projections instead of the model; the base
        is frozen in the --mixed_precision dtype, as the reference LoRA scripts do."""
        self.lora, self.merge_lora = lora, merge
        lora_ops.add_lora(self.model, lora, seed, base_dtype=self.weight_dtype)

    def base_network(self) -> torch.nn.Module:
        """The pretrained network, float32 on the CPU, as its folder holds it."""
        return _load(type(self.model), self.folder, self.spec.model_subfolder)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.from_numpy(self.schedule.alphas_cumprod)

    def to_device(self, batch: dict[str, np.ndarray], device, dtype) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            t = (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).to(device)
            out[k] = t.to(dtype) if t.is_floating_point() else t
        return out

    def float32_parts(self) -> dict:
        """The frozen parts in float32, for an export.

        --mixed_precision loads them in bf16/fp16 for training; exported so beside the fp32
        trained network, the folder would not load without `torch_dtype` (mixed dtypes in one
        pipeline), and casting back would write rounded weights. So those are read again from the
        pretrained folder, on the CPU; parts already in float32 are used as they are.
        """
        parts = {}
        for name in self.frozen_parts:
            module = getattr(self, name)
            if module.dtype != torch.float32:  # the pipeline subfolder is named as the attribute
                module = load_frozen(type(module), self.folder, name, "cpu", torch.float32)
            parts[name] = module
        return parts

    def export(self, model: torch.nn.Module, output_dir: str | Path) -> Path:
        """The trained network as users load it: the pipeline folder of a full fine-tune; the
        adapter file of a LoRA run (and, with `merge_lora`, the folder of the merged network,
        folded into the float32 base: an export is float32 whatever the training precision)."""
        out = Path(output_dir)
        if self.lora is None:
            return self.export_pipeline(model, out)
        adapter = lora_ops.to_peft(model)
        write_adapter(out, adapter, self.lora)
        if self.merge_lora:
            merged = lora_ops.add_lora(self.base_network(), self.lora)
            lora_ops.from_peft(merged, adapter)
            self.export_pipeline(lora_ops.fold(merged), out)
        return out

    def export_pipeline(self, model: torch.nn.Module, out: Path) -> Path:
        """The stage's diffusers pipeline folder with `model` as its trained network."""
        self.pipeline(model, self.float32_parts()).save_pretrained(out)
        return out


class PriorStage(Stage):
    """PriorTransformer on CLIP text (frozen) -> normalized CLIP image embedding (x0 target)."""

    spec = PRIOR
    frozen_parts = ("text_encoder", "image_encoder")

    @classmethod
    def from_config(cls, cfg: TrainConfig, device, weight_dtype) -> PriorStage:
        """The stage a training run's flags describe; validation also needs the decoder."""
        decoder = None
        if cfg.validation_prompts:
            decoder = _decoder_folder(cfg.pretrained_decoder_model_name_or_path)
        stage = cls(cfg.pretrained_prior_model_name_or_path, device, weight_dtype, decoder)
        return stage._with_lora(cfg)

    def __init__(self, prior_dir: str, device, weight_dtype=torch.float32, decoder_dir=None):
        folder = _prior_folder(prior_dir)
        self.folder = self.prior_folder = folder
        self.decoder_folder = None if decoder_dir is None else Path(decoder_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = load_frozen(
            CLIPTextModelWithProjection, folder, "text_encoder", device, weight_dtype
        )
        self.image_encoder = load_frozen(
            CLIPVisionModelWithProjection, folder, "image_encoder", device, weight_dtype
        )
        self.model = _load(PriorTransformer, folder, "prior").to(device)
        # clip_mean/clip_std are nn.Parameters that never get a gradient: freezing them keeps them
        # out of AdamW's decay and lets DDP run without find_unused_parameters.
        self.model.clip_mean.requires_grad_(False)
        self.model.clip_std.requires_grad_(False)
        self.schedule = NoiseSchedule.prior()
        self.weight_dtype = weight_dtype

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Text and image encoder outputs, of what the batch holds (the embeddings cache encodes
        a list of captions apart from its image)."""
        enc = {}
        if "text_input_ids" in batch:
            out = self.text_encoder(batch["text_input_ids"])
            enc["text_embeds"] = out.text_embeds
            enc["text_hidden_states"] = out.last_hidden_state
            enc["text_mask"] = batch["text_mask"]
        if "clip_pixel_values" in batch:
            enc["image_embeds"] = self.image_encoder(batch["clip_pixel_values"]).image_embeds
        return enc

    def x0_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        return (batch_size, self.model.config.embedding_dim)

    def x0(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        e = enc["image_embeds"]
        mean = self.model.clip_mean.detach().to(e.dtype)
        std = self.model.clip_std.detach().to(e.dtype)
        return (e - mean) / std

    def predict(self, model, x_t, timesteps, enc) -> torch.Tensor:
        return model(
            x_t,
            timestep=timesteps,
            proj_embedding=enc["text_embeds"],
            encoder_hidden_states=enc["text_hidden_states"],
            attention_mask=enc["text_mask"],
        ).predicted_image_embedding

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        # diffusers has no switch for the prior: swap each block's forward on the instance, which
        # keeps parameter names (state_dict keys) unchanged.
        for block in model.transformer_blocks:
            block.forward = _checkpointed(block)

    def pipeline(self, model, frozen: dict | None = None) -> KandinskyV22PriorPipeline:
        """KandinskyV22PriorPipeline with `model` as its prior, the stage's frozen parts or those
        of `frozen` (name -> module)."""
        parts = {name: getattr(self, name) for name in self.frozen_parts}
        return KandinskyV22PriorPipeline(
            prior=model,
            tokenizer=self.tokenizer,
            scheduler=UnCLIPScheduler.from_pretrained(self.folder, subfolder="scheduler"),
            image_processor=image_processor(self.folder),
            **{**parts, **(frozen or {})},
        )

    def validation_pipelines(self, model) -> tuple:
        """(prior, decoder) pipelines in which `model` replaces the pretrained prior."""
        return self.pipeline(model), KandinskyV22Pipeline.from_pretrained(self.decoder_folder)


class DecoderStage(Stage):
    """UNet on MoVQ latents, conditioned on the CLIP image embedding (epsilon or v target)."""

    spec = DECODER
    frozen_parts = ("movq",)

    @classmethod
    def from_config(cls, cfg: TrainConfig, device, weight_dtype) -> DecoderStage:
        """The stage a training run's flags describe."""
        stage = cls(
            cfg.pretrained_decoder_model_name_or_path,
            cfg.pretrained_prior_model_name_or_path,
            device,
            weight_dtype,
            prediction_type=cfg.prediction_type,
        )
        return stage._with_lora(cfg)

    def __init__(
        self,
        decoder_dir: str,
        prior_dir: str,
        device,
        weight_dtype=torch.float32,
        prediction_type: str | None = None,
    ):
        folder, prior = _decoder_folder(decoder_dir), _prior_folder(prior_dir)
        self.folder, self.prior_folder = folder, prior
        self.image_encoder = load_frozen(
            CLIPVisionModelWithProjection, prior, "image_encoder", device, weight_dtype
        )
        self.movq = load_frozen(VQModel, folder, "movq", device, weight_dtype)
        self.model = _load(UNet2DConditionModel, folder, "unet").to(device)
        self.schedule = NoiseSchedule.for_training(
            read_config(folder / "scheduler"), prediction_type=prediction_type
        )
        self.weight_dtype = weight_dtype

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "latents": self.movq.encode(batch["pixel_values"]).latents,
            "image_embeds": self.image_encoder(batch["clip_pixel_values"]).image_embeds,
        }

    def x0_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        factor = 2 ** (len(self.movq.config.block_out_channels) - 1)
        side = resolution // factor
        return (batch_size, self.movq.config.latent_channels, side, side)

    def x0(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return enc["latents"]

    def predict(self, model, x_t, timesteps, enc) -> torch.Tensor:
        out = model(x_t, timesteps, None, added_cond_kwargs={"image_embeds": enc["image_embeds"]})
        return out.sample[:, :4]  # channels 4..7 are the learned-variance head, unused in training

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        model.enable_gradient_checkpointing()

    def pipeline(self, model, frozen: dict | None = None) -> KandinskyV22Pipeline:
        """KandinskyV22Pipeline with `model` as its UNet, the stage's frozen parts or those of
        `frozen` (name -> module)."""
        parts = {name: getattr(self, name) for name in self.frozen_parts}
        return KandinskyV22Pipeline(
            unet=model,
            scheduler=DDPMScheduler.from_pretrained(self.folder, subfolder="scheduler"),
            **{**parts, **(frozen or {})},
        )

    def validation_pipelines(self, model) -> tuple:
        """(prior, decoder) pipelines in which `model` replaces the pretrained UNet."""
        prior = KandinskyV22PriorPipeline.from_pretrained(
            self.prior_folder, image_processor=image_processor(self.prior_folder)
        )
        return prior, self.pipeline(model)

    def export_pipeline(self, model: torch.nn.Module, out: Path) -> Path:
        """KandinskyV22Pipeline folder with a README.md naming the prior, so
        AutoPipelineForText2Image builds the combined pipeline."""
        super().export_pipeline(model, out)
        prior = str(self.prior_folder.resolve())
        write_decoder_readme(out, prior=prior, base_model=str(self.folder))
        return out


STAGES: dict[str, type[Stage]] = {s.spec.name: s for s in (PriorStage, DecoderStage)}


def make_stage(cfg: TrainConfig, stage_name: str, device, weight_dtype) -> Stage:
    """The `stage_name` stage ("prior" or "decoder") of a training run's flags."""
    return STAGES[stage_name].from_config(cfg, device, weight_dtype)
