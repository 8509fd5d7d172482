"""What the two stages differ in (docs/architecture.md, "Stages"), and nothing else.

Mirrors torch_kandinsky/stages.py. A Stage loads its frozen encoders and its trainable network
with our Flax ports, out of diffusers folders; `encode`, `x0` and `predict` are pure functions of
the modules they are given, so the train step can call them under jit on merged `nnx` state.
Numpy batches and the noise stream use the reference layout (NCHW); images become NHWC here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPTokenizer

from flax_kandinsky.models.clip import load_image_encoder, load_text_encoder
from flax_kandinsky.models.layers import set_attention
from flax_kandinsky.models.movq import load_movq
from flax_kandinsky.models.prior import load_prior, save_prior
from flax_kandinsky.models.unet import load_unet, save_unet
from kandinsky_common.errors import UserError
from kandinsky_common.folders import check_pipeline_folder, read_config, write_decoder_readme
from kandinsky_common.schedule import NoiseSchedule
from kandinsky_common.stage_spec import DECODER, PRIOR, StageSpec


def _nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


def _copy_subfolders(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
    shutil.copy2(src / "model_index.json", dst / "model_index.json")


class Stage:
    spec: StageSpec
    schedule: NoiseSchedule
    model: nnx.Module  # the trainable network
    model_config: dict
    frozen: dict[str, nnx.Module]  # frozen encoders, by name

    def noise_layout(self, noise: np.ndarray) -> np.ndarray:
        """Noise drawn in the reference layout -> this backend's x0 layout."""
        return noise

    @staticmethod
    def to_reference(enc: dict) -> dict:
        """Encoder outputs -> the reference layout the cache stores (NCHW latents)."""
        return enc

    @staticmethod
    def from_reference(enc: dict) -> dict:
        return enc


class PriorStage(Stage):
    """PriorTransformer on CLIP text (frozen) -> normalized CLIP image embedding (x0 target)."""

    spec = PRIOR

    def __init__(
        self, prior_dir, *, dtype=None, frozen_dtype=jnp.float32, remat=False, attention="dot"
    ):
        folder = check_pipeline_folder(prior_dir, "prior", "--pretrained_prior_model_name_or_path")
        self.folder = folder
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        kw = dict(dtype=dtype, param_dtype=frozen_dtype)
        self.frozen = {
            "text_encoder": load_text_encoder(folder / "text_encoder", **kw)[0],
            "image_encoder": load_image_encoder(folder / "image_encoder", **kw)[0],
        }
        self.model, self.model_config = load_prior(
            folder / "prior", dtype=dtype, gradient_checkpointing=remat
        )
        self.schedule = NoiseSchedule.prior()
        set_attention(attention, self.model, *self.frozen.values())

    def x0_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        return (batch_size, self.model.config.embedding_dim)

    @staticmethod
    def encode(frozen, batch):
        """Text and image encoder outputs, of what the batch holds (the embeddings cache encodes
        a list of captions apart from its image)."""
        enc = {}
        if "text_input_ids" in batch:
            out = frozen["text_encoder"](batch["text_input_ids"])
            enc["text_embeds"] = out["text_embeds"]
            enc["text_hidden_states"] = out["last_hidden_state"]
            enc["text_mask"] = batch["text_mask"]
        if "clip_pixel_values" in batch:
            image = frozen["image_encoder"](_nhwc(batch["clip_pixel_values"]))
            enc["image_embeds"] = image["image_embeds"]
        return enc

    @staticmethod
    def x0(model, enc):
        e = enc["image_embeds"]
        return (e - model.clip_mean[...].astype(e.dtype)) / model.clip_std[...].astype(e.dtype)

    @staticmethod
    def predict(model, x_t, timesteps, enc):
        return model(
            x_t,
            timesteps,
            enc["text_embeds"],
            enc["text_hidden_states"],
            attention_mask=enc["text_mask"],
        )

    def export(self, model, output_dir: str | Path) -> Path:
        """KandinskyV22PriorPipeline folder: the trained prior, the rest as given."""
        out = Path(output_dir)
        names = ("text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor")
        _copy_subfolders(self.folder, out, names)
        save_prior(model, self.model_config, out / "prior")
        return out


class DecoderStage(Stage):
    """UNet on MoVQ latents, conditioned on the CLIP image embedding (epsilon or v target)."""

    spec = DECODER

    def __init__(
        self,
        decoder_dir,
        prior_dir,
        *,
        dtype=None,
        frozen_dtype=jnp.float32,
        remat=False,
        prediction_type: str | None = None,
        attention="dot",
    ):
        folder = check_pipeline_folder(
            decoder_dir, "decoder", "--pretrained_decoder_model_name_or_path"
        )
        prior = check_pipeline_folder(prior_dir, "prior", "--pretrained_prior_model_name_or_path")
        self.folder, self.prior_folder = folder, prior
        kw = dict(dtype=dtype, param_dtype=frozen_dtype)
        self.frozen = {
            "image_encoder": load_image_encoder(prior / "image_encoder", **kw)[0],
            "movq": load_movq(folder / "movq", **kw)[0],
        }
        self.movq_config = read_config(folder / "movq")
        self.model, self.model_config = load_unet(
            folder / "unet", dtype=dtype, gradient_checkpointing=remat
        )
        set_attention(attention, self.model, *self.frozen.values())
        self.schedule = NoiseSchedule.from_config(
            read_config(folder / "scheduler"), prediction_type=prediction_type
        )
        if self.schedule.prediction_type == "sample":
            raise UserError(
                "the decoder scheduler predicts 'sample'; pass --prediction_type epsilon"
            )

    def x0_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        factor = 2 ** (len(self.movq_config["block_out_channels"]) - 1)
        side = resolution // factor
        return (batch_size, self.movq_config.get("latent_channels", 4), side, side)

    def noise_layout(self, noise: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(noise.transpose(0, 2, 3, 1))  # NCHW -> NHWC

    @staticmethod
    def to_reference(enc: dict) -> dict:
        return {**enc, "latents": jnp.transpose(enc["latents"], (0, 3, 1, 2))}  # NHWC -> NCHW

    @staticmethod
    def from_reference(enc: dict) -> dict:
        return {**enc, "latents": _nhwc(enc["latents"])}

    @staticmethod
    def encode(frozen, batch):
        return {
            "latents": frozen["movq"].encode(_nhwc(batch["pixel_values"])),
            "image_embeds": frozen["image_encoder"](_nhwc(batch["clip_pixel_values"]))[
                "image_embeds"
            ],
        }

    @staticmethod
    def x0(model, enc):
        return enc["latents"]

    @staticmethod
    def predict(model, x_t, timesteps, enc):
        # channels 4..7 are the learned-variance head, unused in training
        return model(x_t, timesteps, enc["image_embeds"])[..., :4]

    def export(self, model, output_dir: str | Path) -> Path:
        """KandinskyV22Pipeline folder with a README naming the prior (AutoPipeline needs it)."""
        out = Path(output_dir)
        _copy_subfolders(self.folder, out, ("movq", "scheduler"))
        save_unet(model, self.model_config, out / "unet")
        write_decoder_readme(
            out, prior=str(self.prior_folder.resolve()), base_model=str(self.folder)
        )
        return out
