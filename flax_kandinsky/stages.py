"""What the two stages differ in (docs/architecture.md, "Stages"), and nothing else.

Mirrors torch_kandinsky/stages.py. A Stage holds its frozen encoders and its trainable network
(our Flax ports), built from diffusers folders, from a TrainConfig, or from configs with shapes
only (the TPU plan); `encode`, `x0` and `predict` are pure functions of the modules they are
given, so the train step can call them under jit on merged `nnx` state. Numpy batches and the
noise stream use the reference layout (NCHW); images become NHWC here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_kandinsky import lora as lora_ops
from flax_kandinsky.models.clip import (
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    load_image_encoder,
    load_text_encoder,
)
from flax_kandinsky.models.layers import set_attention
from flax_kandinsky.models.movq import VQModel, load_movq
from flax_kandinsky.models.prior import PriorTransformer, load_prior, save_prior
from flax_kandinsky.models.unet import UNet2DConditionModel, load_unet, save_unet
from flax_kandinsky.pretrained import build_abstract
from kandinsky_common.flags import TrainConfig
from kandinsky_common.folders import check_pipeline_folder, read_config, write_decoder_readme
from kandinsky_common.lora import LoraSettings, initial_adapter, write_adapter
from kandinsky_common.schedule import NoiseSchedule
from kandinsky_common.stage_spec import DECODER, PRIOR, StageSpec
from kandinsky_common.storage import location, staged_folder

CLIP_PIXELS = 224  # the CLIP image processor's crop
TEXT_TOKENS = 77  # the CLIP tokenizer's max length


def _nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))  # (B, C, H, W) -> (B, H, W, C)


def _copy_subfolders(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
    shutil.copy2(src / "model_index.json", dst / "model_index.json")


def _dtypes(cfg: TrainConfig) -> dict:
    """Compute and frozen-parameter dtypes of --mixed_precision (trained params stay fp32)."""
    bf16 = cfg.mixed_precision == "bf16"
    return dict(
        dtype=jnp.bfloat16 if bf16 else None, frozen_dtype=jnp.bfloat16 if bf16 else jnp.float32
    )


def encoder_dtype(cfg: TrainConfig):
    """The dtype of the frozen encoders' outputs under --mixed_precision (None: float32)."""
    return _dtypes(cfg)["dtype"]


def _lora_kw(cfg: TrainConfig, spec: StageSpec) -> dict:
    """The LoRA keywords of a stage constructor, from a LoRA script's flags (none otherwise)."""
    lora = LoraSettings.from_config(cfg, spec)
    if lora is None:
        return {}
    return dict(lora=lora, lora_seed=cfg.seed or 0, merge_lora=cfg.merge_lora)


def _base_dtype(frozen_dtype, lora_kw: dict):
    """The trained network's parameter dtype: float32 master weights, unless only adapters
    train; then its base is frozen like the encoders (bf16 under --mixed_precision bf16)."""
    return frozen_dtype if lora_kw.get("lora") is not None else jnp.float32


def _tokenizer(folder: Path):
    """The prior folder's CLIPTokenizer. Imported here, not at the top: resolving it costs 0.26 s
    of every start, and the decoder never tokenizes."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder / "tokenizer")


def _prior_folder(path) -> Path:
    return check_pipeline_folder(path, "prior", "--pretrained_prior_model_name_or_path")


class Stage:
    """One trainable network, its frozen encoders and its noise schedule.

    Parameters:
        model: the trainable network; model_config: its config (written by `export`).
        frozen: frozen encoders by name; configs: the config of every part, by subfolder name.
        schedule: the training noise schedule.
        folder: the stage's own pipeline folder; prior_folder: the prior pipeline folder (whose
            image encoder and image processor both stages use). None when built from configs.
        attention: the attention kernel of every part ("dot" or "chunked").
        lora: adapters on the model's attention projections (then only they train, drawn by
            `initial_adapter` from `lora_seed`; `merge_lora`: the export also writes the merged
            pipeline folder).
    """

    spec: StageSpec
    params_key: str  # Sampler's keyword for this stage's trained params

    def __init__(
        self,
        model: nnx.Module,
        model_config: dict,
        frozen: dict[str, nnx.Module],
        configs: dict[str, dict],
        schedule: NoiseSchedule,
        *,
        folder: Path | None = None,
        prior_folder: Path | None = None,
        tokenizer=None,
        attention: str = "dot",
        lora: LoraSettings | None = None,
        lora_seed: int = 0,
        merge_lora: bool = False,
    ):
        self.model, self.model_config, self.frozen = model, model_config, frozen
        self.configs, self.schedule = configs, schedule
        self.folder, self.prior_folder, self.tokenizer = folder, prior_folder, tokenizer
        self.lora, self.merge_lora = lora, merge_lora
        if lora is not None:
            lora_ops.add_lora(self.model, lora)
            shapes = {k: v.shape for k, v in lora_ops.to_peft(self.model).items()}
            lora_ops.from_peft(self.model, initial_adapter(shapes, lora_seed))
        set_attention(attention, self.model, *self.frozen.values())

    @property
    def trainable(self) -> type[nnx.Variable]:
        """The variables that train: the adapters of a LoRA run, else every nnx.Param."""
        return nnx.Param if self.lora is None else nnx.LoRAParam

    def sampling_params(self, trained: dict) -> dict:
        """The network's params for a sampler, given the trained ones (a pure dict): the
        adapter folded into the base weights for a LoRA run."""
        if self.lora is None:
            return trained
        return lora_ops.merged_params(self.model, trained)

    def export(self, model, output_dir: str | Path) -> Path:
        """The trained network as users load it: the pipeline folder of a full fine-tune; the
        adapter file of a LoRA run (and, with `merge_lora`, the folder of the merged network)."""
        # A bucket (gs://) gets the folder written locally, then uploaded.
        with staged_folder(output_dir) as out:
            if self.lora is None:
                self.export_pipeline(model, out)
                return location(output_dir)
            adapter = lora_ops.to_peft(model)
            write_adapter(out, adapter, self.lora)
            if self.merge_lora:
                # folded into the float32 base as its folder holds it: an export is float32
                # whatever the training precision, and the stage's own model keeps its adapter
                merged = self.base_network()
                lora_ops.add_lora(merged, self.lora)
                lora_ops.from_peft(merged, adapter)
                self.export_pipeline(lora_ops.fold(merged), out)
        return location(output_dir)

    def noise_layout(self, noise: np.ndarray) -> np.ndarray:
        """Noise drawn in the reference layout -> this backend's x0 layout."""
        return noise

    def noise_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        """Shape of the noise the step receives (this backend's x0 layout)."""
        return self.x0_shape(batch_size, resolution)

    @staticmethod
    def to_torch_layout(enc: dict) -> dict:
        """Encoder outputs -> the reference layout the cache stores (NCHW latents)."""
        return enc

    @staticmethod
    def from_torch_layout(enc: dict) -> dict:
        return enc


class PriorStage(Stage):
    """PriorTransformer on CLIP text (frozen) -> normalized CLIP image embedding (x0 target)."""

    spec = PRIOR
    params_key = "prior_params"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PriorStage:
        """The stage a training run's flags describe (folders, precision, remat, attention)."""
        return cls.from_folders(
            cfg.pretrained_prior_model_name_or_path,
            remat=cfg.gradient_checkpointing,
            attention=cfg.attention,
            **_dtypes(cfg),
            **_lora_kw(cfg, cls.spec),
        )

    @classmethod
    def from_folders(
        cls,
        prior_dir,
        *,
        dtype=None,
        frozen_dtype=jnp.float32,
        remat=False,
        attention="dot",
        **lora_kw,
    ) -> PriorStage:
        folder = _prior_folder(prior_dir)
        kw = dict(dtype=dtype, param_dtype=frozen_dtype)
        text_encoder, text_config = load_text_encoder(folder / "text_encoder", **kw)
        image_encoder, image_config = load_image_encoder(folder / "image_encoder", **kw)
        model, config = load_prior(
            folder / "prior",
            dtype=dtype,
            param_dtype=_base_dtype(frozen_dtype, lora_kw),
            gradient_checkpointing=remat,
        )
        return cls(
            model,
            config,
            {"text_encoder": text_encoder, "image_encoder": image_encoder},
            {"text_encoder": text_config, "image_encoder": image_config, "prior": config},
            NoiseSchedule.prior(),
            folder=folder,
            prior_folder=folder,
            tokenizer=_tokenizer(folder),
            attention=attention,
            **lora_kw,
        )

    @classmethod
    def from_configs(
        cls,
        configs: dict,
        *,
        dtype=None,
        frozen_dtype=jnp.float32,
        remat=False,
        attention="dot",
        **lora_kw,
    ) -> PriorStage:
        """Shapes and dtypes only, no weights (nnx.eval_shape): what the TPU plan compiles."""
        kw = dict(dtype=dtype, param_dtype=frozen_dtype)
        frozen = {
            "text_encoder": build_abstract(
                lambda r: CLIPTextModelWithProjection(configs["text_encoder"], rngs=r, **kw)
            ),
            "image_encoder": build_abstract(
                lambda r: CLIPVisionModelWithProjection(configs["image_encoder"], rngs=r, **kw)
            ),
        }
        model = build_abstract(
            lambda r: PriorTransformer(
                configs["prior"],
                gradient_checkpointing=remat,
                dtype=dtype,
                param_dtype=_base_dtype(frozen_dtype, lora_kw),
                rngs=r,
            )
        )
        schedule = NoiseSchedule.prior()
        return cls(
            model, configs["prior"], frozen, configs, schedule, attention=attention, **lora_kw
        )

    def x0_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        return (batch_size, self.model.config.embedding_dim)

    def batch_shapes(self, b: int, resolution: int, cached: bool) -> dict:
        """(shape, dtype) of each batch entry the step reads: pixels and tokens, or with
        `cached` the encoder outputs (reference layout)."""
        e = self.model.config.embedding_dim
        if cached:
            return {
                "text_embeds": ((b, e), jnp.float32),
                "text_hidden_states": ((b, TEXT_TOKENS, e), jnp.float32),
                "text_mask": ((b, TEXT_TOKENS), jnp.bool_),
                "image_embeds": ((b, e), jnp.float32),
            }
        return {
            "text_input_ids": ((b, TEXT_TOKENS), jnp.int32),
            "text_mask": ((b, TEXT_TOKENS), jnp.bool_),
            "clip_pixel_values": ((b, 3, CLIP_PIXELS, CLIP_PIXELS), jnp.float32),
        }

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

    def base_network(self) -> PriorTransformer:
        """The pretrained prior, float32, as its folder holds it."""
        return load_prior(self.folder / "prior")[0]

    def export_pipeline(self, model, out: Path) -> Path:
        """KandinskyV22PriorPipeline folder: the trained prior, the rest as given."""
        names = ("text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor")
        _copy_subfolders(self.folder, out, names)
        save_prior(model, self.model_config, out / "prior")
        return out


class DecoderStage(Stage):
    """UNet on MoVQ latents, conditioned on the CLIP image embedding (epsilon or v target)."""

    spec = DECODER
    params_key = "unet_params"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> DecoderStage:
        """The stage a training run's flags describe (folders, precision, remat, attention)."""
        return cls.from_folders(
            cfg.pretrained_decoder_model_name_or_path,
            cfg.pretrained_prior_model_name_or_path,
            prediction_type=cfg.prediction_type,
            remat=cfg.gradient_checkpointing,
            attention=cfg.attention,
            **_dtypes(cfg),
            **_lora_kw(cfg, cls.spec),
        )

    @classmethod
    def from_folders(
        cls,
        decoder_dir,
        prior_dir,
        *,
        dtype=None,
        frozen_dtype=jnp.float32,
        remat=False,
        prediction_type: str | None = None,
        attention="dot",
        **lora_kw,
    ) -> DecoderStage:
        folder = check_pipeline_folder(
            decoder_dir, "decoder", "--pretrained_decoder_model_name_or_path"
        )
        prior = _prior_folder(prior_dir)
        kw = dict(dtype=dtype, param_dtype=frozen_dtype)
        image_encoder, image_config = load_image_encoder(prior / "image_encoder", **kw)
        movq, movq_config = load_movq(folder / "movq", **kw)
        model, config = load_unet(
            folder / "unet",
            dtype=dtype,
            param_dtype=_base_dtype(frozen_dtype, lora_kw),
            gradient_checkpointing=remat,
        )
        schedule = NoiseSchedule.for_training(
            read_config(folder / "scheduler"), prediction_type=prediction_type
        )
        return cls(
            model,
            config,
            {"image_encoder": image_encoder, "movq": movq},
            {"image_encoder": image_config, "movq": movq_config, "unet": config},
            schedule,
            folder=folder,
            prior_folder=prior,
            attention=attention,
            **lora_kw,
        )

    @classmethod
    def from_configs(
        cls,
        configs: dict,
        *,
        dtype=None,
        frozen_dtype=jnp.float32,
        remat=False,
        attention="dot",
        **lora_kw,
    ) -> DecoderStage:
        """Shapes and dtypes only, no weights (nnx.eval_shape): what the TPU plan compiles."""
        kw = dict(dtype=dtype, param_dtype=frozen_dtype)
        frozen = {
            "image_encoder": build_abstract(
                lambda r: CLIPVisionModelWithProjection(configs["image_encoder"], rngs=r, **kw)
            ),
            "movq": build_abstract(lambda r: VQModel(configs["movq"], rngs=r, **kw)),
        }
        model = build_abstract(
            lambda r: UNet2DConditionModel(
                configs["unet"],
                dtype=dtype,
                param_dtype=_base_dtype(frozen_dtype, lora_kw),
                gradient_checkpointing=remat,
                rngs=r,
            )
        )
        schedule = NoiseSchedule.for_training(configs["decoder_scheduler"])
        return cls(
            model, configs["unet"], frozen, configs, schedule, attention=attention, **lora_kw
        )

    def x0_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        movq = self.configs["movq"]
        factor = 2 ** (len(movq["block_out_channels"]) - 1)
        side = resolution // factor
        return (batch_size, movq.get("latent_channels", 4), side, side)

    def noise_shape(self, batch_size: int, resolution: int) -> tuple[int, ...]:
        n, c, h, w = self.x0_shape(batch_size, resolution)
        return (n, h, w, c)  # the step's NHWC x0 layout

    def batch_shapes(self, b: int, resolution: int, cached: bool) -> dict:
        """(shape, dtype) of each batch entry the step reads: pixels, or with `cached` the
        encoder outputs (reference layout)."""
        if cached:
            return {
                "latents": (self.x0_shape(b, resolution), jnp.float32),
                "image_embeds": ((b, self.configs["image_encoder"]["projection_dim"]), jnp.float32),
            }
        return {
            "pixel_values": ((b, 3, resolution, resolution), jnp.float32),
            "clip_pixel_values": ((b, 3, CLIP_PIXELS, CLIP_PIXELS), jnp.float32),
        }

    def noise_layout(self, noise: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(noise.transpose(0, 2, 3, 1))  # NCHW -> NHWC

    @staticmethod
    def to_torch_layout(enc: dict) -> dict:
        return {**enc, "latents": jnp.transpose(enc["latents"], (0, 3, 1, 2))}  # NHWC -> NCHW

    @staticmethod
    def from_torch_layout(enc: dict) -> dict:
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

    def base_network(self) -> UNet2DConditionModel:
        """The pretrained UNet, float32, as its folder holds it."""
        return load_unet(self.folder / "unet")[0]

    def export_pipeline(self, model, out: Path) -> Path:
        """KandinskyV22Pipeline folder with a README naming the prior (AutoPipeline needs it)."""
        _copy_subfolders(self.folder, out, ("movq", "scheduler"))
        save_unet(model, self.model_config, out / "unet")
        write_decoder_readme(
            out, prior=str(self.prior_folder.resolve()), base_model=str(self.folder)
        )
        return out


STAGES: dict[str, type[Stage]] = {s.spec.name: s for s in (PriorStage, DecoderStage)}


def make_stage(cfg: TrainConfig, stage_name: str) -> Stage:
    """The `stage_name` stage ("prior" or "decoder") of a training run's flags."""
    return STAGES[stage_name].from_config(cfg)
