"""What the two stages differ in (docs/architecture.md, "Stages"), and nothing else.

A Stage loads its frozen encoders and its trainable network from diffusers folders, encodes a numpy
batch on the device (no grad), turns encoder outputs into x0, predicts with the trainable network,
and names its schedule. Loop, step, optimizer, checkpoints and export are shared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from kandinsky_common.errors import UserError
from kandinsky_common.folders import check_pipeline_folder, read_config
from kandinsky_common.schedule import NoiseSchedule
from kandinsky_common.stage_spec import DECODER, PRIOR, StageSpec


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


class Stage:
    spec: StageSpec
    model: torch.nn.Module  # the trainable network
    schedule: NoiseSchedule

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.from_numpy(self.schedule.alphas_cumprod)

    def to_device(self, batch: dict[str, np.ndarray], device, dtype) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            t = (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).to(device)
            out[k] = t.to(dtype) if t.is_floating_point() else t
        return out


class PriorStage(Stage):
    """PriorTransformer on CLIP text (frozen) -> normalized CLIP image embedding (x0 target)."""

    spec = PRIOR

    def __init__(self, prior_dir: str, device, weight_dtype=torch.float32):
        folder = check_pipeline_folder(prior_dir, "prior", "--pretrained_prior_model_name_or_path")
        self.folder = folder
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


class DecoderStage(Stage):
    """UNet on MoVQ latents, conditioned on the CLIP image embedding (epsilon or v target)."""

    spec = DECODER

    def __init__(
        self,
        decoder_dir: str,
        prior_dir: str,
        device,
        weight_dtype=torch.float32,
        prediction_type: str | None = None,
    ):
        folder = check_pipeline_folder(
            decoder_dir, "decoder", "--pretrained_decoder_model_name_or_path"
        )
        prior = check_pipeline_folder(prior_dir, "prior", "--pretrained_prior_model_name_or_path")
        self.folder, self.prior_folder = folder, prior
        self.image_encoder = load_frozen(
            CLIPVisionModelWithProjection, prior, "image_encoder", device, weight_dtype
        )
        self.movq = load_frozen(VQModel, folder, "movq", device, weight_dtype)
        self.model = _load(UNet2DConditionModel, folder, "unet").to(device)
        self.schedule = NoiseSchedule.from_config(
            read_config(folder / "scheduler"), prediction_type=prediction_type
        )
        if self.schedule.prediction_type == "sample":
            raise UserError(
                "the decoder scheduler predicts 'sample'; pass --prediction_type epsilon"
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
