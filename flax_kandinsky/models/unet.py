"""Flax NNX port of diffusers' UNet2DConditionModel, the Kandinsky 2.2 decoder subset (NHWC).

The model takes latents (B, H, W, in_channels), timesteps (B,) or a scalar, and CLIP image
embeddings (B, encoder_hid_dim), and returns (B, H, W, out_channels) — the NHWC transpose of
diffusers' `unet(sample, t, None, added_cond_kwargs={"image_embeds": e}).sample`. H and W must be
divisible by 2 ** (number of blocks - 1): the up blocks always upsample by exactly 2.

Supported configs: the K2.2 decoder family (addition_embed_type "image", encoder_hid_dim_type
"image_proj", positional time embedding, ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D /
UNetMidBlock2DSimpleCrossAttn / SimpleCrossAttnUpBlock2D / ResnetUpsampleBlock2D). Anything else
raises UserError naming the option, before any parameter is built.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flax_kandinsky.convert.unet import UNET_TABLE
from flax_kandinsky.models.layers import (
    conv2d,
    get_activation,
    group_norm,
    layer_norm,
    linear,
    timestep_embedding,
)
from flax_kandinsky.models.unet_blocks import (
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
)
from flax_kandinsky.pretrained import from_folder, save_folder
from kandinsky_common.errors import UserError

# diffusers UNet2DConditionModel.__init__ defaults (0.42.1): absent config keys take these.
UNET_DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

DOWN_TYPES = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_TYPES = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_TYPE = "UNetMidBlock2DSimpleCrossAttn"

# Options that must keep exactly this value (any other value is outside the port).
_FIXED = {
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": "image",
    "encoder_hid_dim_type": "image_proj",
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "upcast_attention": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "dropout": 0.0,
    "mid_block_type": MID_TYPE,
}


def _unsupported(option: str, value, why: str) -> UserError:
    return UserError(
        f"UNet config option {option}={value!r} is not supported by the Flax port ({why}); "
        "use the Kandinsky 2.2 decoder UNet layout or the torch backend"
    )


def _per_block(config: dict, key: str, n: int) -> list:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"UNet config {key} has {len(value)} entries for {n} down blocks")
        return list(value)
    return [value] * n


def resolve_unet_config(config: Mapping) -> dict:
    """diffusers defaults filled in, unknown-to-the-port options rejected (UserError)."""
    cfg = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, want in _FIXED.items():
        if cfg[key] != want:
            raise _unsupported(key, cfg[key], f"only {want!r} is implemented")
    if cfg["encoder_hid_dim"] is None:
        raise _unsupported("encoder_hid_dim", None, "image_proj needs the image embedding width")
    if cfg["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise _unsupported("resnet_time_scale_shift", cfg["resnet_time_scale_shift"], "resnets")
    only_cross = cfg["only_cross_attention"]
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise _unsupported("only_cross_attention", only_cross, "only self+context attention")
    if cfg["mid_block_only_cross_attention"]:
        raise _unsupported("mid_block_only_cross_attention", True, "only self+context attention")
    for key in ("cross_attention_dim", "norm_num_groups"):
        if not isinstance(cfg[key], int):
            raise _unsupported(key, cfg[key], "a single integer is required")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(down)
    for key, types, allowed in (
        ("down_block_types", down, DOWN_TYPES),
        ("up_block_types", up, UP_TYPES),
    ):
        for t in types:
            if t.removeprefix("UNetRes") not in allowed:
                raise _unsupported(key, t, f"blocks {allowed}")
    if len(up) != n or len(cfg["block_out_channels"]) != n:
        raise UserError(
            f"UNet config has {n} down_block_types, {len(up)} up_block_types and "
            f"{len(cfg['block_out_channels'])} block_out_channels; they must be equal"
        )
    head_dims = _per_block(cfg, "attention_head_dim", n)
    if not all(isinstance(d, int) and d > 0 for d in head_dims):
        raise _unsupported("attention_head_dim", cfg["attention_head_dim"], "integers needed")
    _per_block(cfg, "layers_per_block", n)
    return cfg


class TimestepEmbedding(nnx.Module):
    """linear_1 -> activation -> linear_2 (diffusers TimestepEmbedding without cond/post act).

    Parameters:
        in_channels: width of the sinusoidal embedding; time_embed_dim: output width.
        act_fn: activation name. dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self,
        in_channels,
        time_embed_dim,
        act_fn="silu",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        self.act = get_activation(act_fn)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, t_emb: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(t_emb)))


class ImageProjection(nnx.Module):
    """CLIP image embedding -> `num_image_text_embeds` context tokens (encoder_hid_proj).

    Parameters:
        image_embed_dim: CLIP embedding width; cross_attention_dim: token width;
        num_image_text_embeds: number of tokens (32). dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self,
        image_embed_dim,
        cross_attention_dim,
        num_image_text_embeds=32,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = linear(
            image_embed_dim, num_image_text_embeds * cross_attention_dim, **kw
        )
        self.norm = layer_norm(cross_attention_dim, 1e-5, **kw)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        x = self.image_embeds(image_embeds)
        # token-major: features [k*D:(k+1)*D] are token k. (B, T*D) -> (B, T, D)
        x = x.reshape(x.shape[0], self.num_image_text_embeds, -1)
        return self.norm(x)


class ImageTimeEmbedding(nnx.Module):
    """CLIP image embedding added to the time embedding: image_proj -> image_norm (add_embedding).

    Parameters:
        image_embed_dim: CLIP embedding width; time_embed_dim: time embedding width.
        dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self, image_embed_dim, time_embed_dim, *, dtype=None, param_dtype=jnp.float32, rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_proj = linear(image_embed_dim, time_embed_dim, **kw)
        self.image_norm = layer_norm(time_embed_dim, 1e-5, **kw)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        return self.image_norm(self.image_proj(image_embeds))


class UNet2DConditionModel(nnx.Module):
    """The Kandinsky 2.2 decoder UNet (diffusers UNet2DConditionModel subset), NHWC.

    Parameters:
        config: a diffusers UNet config dict (config.json contents); absent keys take diffusers'
            defaults; options outside the K2.2 subset raise UserError.
        dtype: compute dtype (None: follow the inputs/params, i.e. fp32); bf16 with fp32 params
            is the mixed-precision setting.
        param_dtype: parameter dtype (fp32).
        gradient_checkpointing: wrap every resnet and attention call in `nnx.remat`.
        rngs: initialisation keys.

    __call__(sample (B,H,W,C_in), timestep (B,) or scalar, image_embeds (B, encoder_hid_dim))
    returns (B,H,W,out_channels).
    """

    def __init__(
        self,
        config: Mapping,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        gradient_checkpointing: bool = False,
        rngs: nnx.Rngs,
    ):
        cfg = resolve_unet_config(config)
        self.dtype = dtype
        n = len(cfg["down_block_types"])
        boc = list(cfg["block_out_channels"])
        layers = _per_block(cfg, "layers_per_block", n)
        head_dims = _per_block(cfg, "attention_head_dim", n)
        cross = cfg["cross_attention_dim"]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        remat = gradient_checkpointing
        self.flip_sin_to_cos = bool(cfg["flip_sin_to_cos"])
        self.freq_shift = cfg["freq_shift"]
        self.time_proj_dim = boc[0]
        time_embed_dim = cfg["time_embedding_dim"] or boc[0] * 4

        self.conv_in = conv2d(cfg["in_channels"], boc[0], 3, padding=1, **kw)
        self.time_embedding = TimestepEmbedding(boc[0], time_embed_dim, cfg["act_fn"], **kw)
        self.encoder_hid_proj = ImageProjection(cfg["encoder_hid_dim"], cross, **kw)
        self.add_embedding = ImageTimeEmbedding(cfg["encoder_hid_dim"], time_embed_dim, **kw)

        resnet_settings = dict(
            temb_channels=time_embed_dim,
            groups=cfg["norm_num_groups"],
            eps=cfg["norm_eps"],
            non_linearity=cfg["act_fn"],
            time_embedding_norm=cfg["resnet_time_scale_shift"],
            skip_time_act=bool(cfg["resnet_skip_time_act"]),
            output_scale_factor=cfg["resnet_out_scale_factor"],
        )
        down_blocks, out_ch = [], boc[0]
        for i, block_type in enumerate(cfg["down_block_types"]):
            in_ch, out_ch = out_ch, boc[i]
            common = dict(
                num_layers=layers[i],
                add_downsample=i < n - 1,
                resnet_settings=resnet_settings,
                remat=remat,
                **kw,
            )
            if block_type.removeprefix("UNetRes") == "ResnetDownsampleBlock2D":
                block = ResnetDownsampleBlock2D(in_ch, out_ch, **common)
            else:
                block = SimpleCrossAttnDownBlock2D(
                    in_ch,
                    out_ch,
                    head_dim=head_dims[i],
                    cross_attention_dim=cross,
                    **common,
                )
            down_blocks.append(block)
        self.down_blocks = nnx.List(down_blocks)

        mid_resnet_settings = {
            **resnet_settings,
            "output_scale_factor": cfg["mid_block_scale_factor"],
        }
        self.mid_block = UNetMidBlock2DSimpleCrossAttn(
            boc[-1],
            head_dim=head_dims[-1],
            cross_attention_dim=cross,
            resnet_settings=mid_resnet_settings,
            remat=remat,
            **kw,
        )

        # diffusers indexes attention_head_dim by the up block position without reversing it.
        rev = list(reversed(boc))
        rev_layers = list(reversed(layers))
        up_blocks, out_ch = [], rev[0]
        for i, block_type in enumerate(cfg["up_block_types"]):
            prev, out_ch, in_ch = out_ch, rev[i], rev[min(i + 1, n - 1)]
            common = dict(
                num_layers=rev_layers[i] + 1,
                add_upsample=i < n - 1,
                resnet_settings=resnet_settings,
                remat=remat,
                **kw,
            )
            if block_type.removeprefix("UNetRes") == "ResnetUpsampleBlock2D":
                block = ResnetUpsampleBlock2D(in_ch, prev, out_ch, **common)
            else:
                block = SimpleCrossAttnUpBlock2D(
                    in_ch,
                    prev,
                    out_ch,
                    head_dim=head_dims[i],
                    cross_attention_dim=cross,
                    **common,
                )
            up_blocks.append(block)
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = group_norm(boc[0], cfg["norm_num_groups"], cfg["norm_eps"], **kw)
        self.conv_act = get_activation(cfg["act_fn"])
        self.conv_out = conv2d(boc[0], cfg["out_channels"], 3, padding=1, **kw)

    @classmethod
    def from_config(
        cls,
        config: Mapping,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        gradient_checkpointing: bool = False,
        rngs: nnx.Rngs,
    ) -> UNet2DConditionModel:
        return cls(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            gradient_checkpointing=gradient_checkpointing,
            rngs=rngs,
        )

    def __call__(self, sample: jax.Array, timestep, image_embeds: jax.Array) -> jax.Array:
        dtype = self.dtype or sample.dtype
        sample = sample.astype(dtype)
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (sample.shape[0],))
        t_emb = timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos, self.freq_shift)
        emb = self.time_embedding(t_emb.astype(dtype)) + self.add_embedding(image_embeds)
        context = self.encoder_hid_proj(image_embeds)  # (B, 32, cross_attention_dim)

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, res = block(h, emb, context)
            skips.extend(res)
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            h = block(h, skips, emb, context)
        h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)


def load_unet(
    folder,
    dtype=None,
    *,
    param_dtype=jnp.float32,
    gradient_checkpointing: bool = False,
) -> tuple[UNet2DConditionModel, dict]:
    """(model, config) from a diffusers `unet/` folder (config.json + safetensors), strictly."""

    def factory(config, rngs):
        return UNet2DConditionModel(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            gradient_checkpointing=gradient_checkpointing,
            rngs=rngs,
        )

    return from_folder(factory, UNET_TABLE, folder)


def save_unet(model: UNet2DConditionModel, config: Mapping, folder, dtype=None):
    """Write `folder` as diffusers' save_pretrained would: config.json (every option resolved,
    `_class_name` set) and diffusion_pytorch_model.safetensors in torch layout (in `dtype`, e.g.
    np.float16, or the parameter dtype)."""
    out = {"_class_name": "UNet2DConditionModel", **resolve_unet_config(config)}
    return save_folder(model, UNET_TABLE, out, folder, dtype=dtype)
