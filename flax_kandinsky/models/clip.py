"""Flax NNX ports of transformers' CLIPTextModelWithProjection and CLIPVisionModelWithProjection.

Attribute paths equal the transformers state-dict keys (`vision_model.pre_layrnorm`,
`text_model.encoder.layers.3.self_attn.q_proj`, ...) with Flax leaf names (`kernel`, `scale`,
`embedding`); the conversion tables in flax_kandinsky/convert/clip.py map one to the other. Both
encoders are frozen in Kandinsky training, so attention dropout is never applied (transformers skips
it in eval mode too).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_kandinsky import pretrained
from flax_kandinsky.convert.clip import TEXT_TABLE, VISION_TABLE, clean_state_dict
from flax_kandinsky.models import abstract, layers
from flax_kandinsky.models.abstract import initializers
from kandinsky_common import folders
from kandinsky_common.errors import UserError

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, used for keys a config.json leaves out.
_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_ACTS = ("gelu", "quick_gelu", "gelu_pytorch_tanh")


def _read(config: dict, defaults: dict, model_type: str, what: str) -> dict:
    found = config.get("model_type", model_type)
    if found != model_type:
        raise UserError(
            f"{what} config has model_type {found!r}, expected {model_type!r}; "
            f"pass the {what} subfolder of the prior pipeline folder"
        )
    out = {k: config.get(k, v) for k, v in defaults.items()}
    for k, v in out.items():
        if k in ("hidden_act", "layer_norm_eps"):
            continue
        least = 0 if k == "eos_token_id" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise UserError(f"{what} config: {k}={v!r} must be an integer >= {least}")
    if out["hidden_act"] not in _ACTS:
        raise UserError(
            f"{what} config: hidden_act={out['hidden_act']!r} is not supported; use one of {_ACTS}"
        )
    if not isinstance(out["layer_norm_eps"], int | float) or out["layer_norm_eps"] <= 0:
        raise UserError(f"{what} config: layer_norm_eps={out['layer_norm_eps']!r} must be > 0")
    if out["hidden_size"] % out["num_attention_heads"]:
        raise UserError(
            f"{what} config: hidden_size {out['hidden_size']} is not divisible by "
            f"num_attention_heads {out['num_attention_heads']}"
        )
    return out


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIPTextConfig fields the port uses (transformers defaults for absent keys)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    projection_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int

    @classmethod
    def from_dict(cls, config: dict) -> TextEncoderConfig:
        return cls(**_read(config, _TEXT_DEFAULTS, "clip_text_model", "text_encoder"))


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The CLIPVisionConfig fields the port uses (transformers defaults for absent keys)."""

    hidden_size: int
    intermediate_size: int
    projection_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, config: dict) -> ImageEncoderConfig:
        cfg = cls(**_read(config, _VISION_DEFAULTS, "clip_vision_model", "image_encoder"))
        if cfg.image_size % cfg.patch_size:
            raise UserError(
                f"image_encoder config: image_size {cfg.image_size} is not a multiple of "
                f"patch_size {cfg.patch_size}"
            )
        return cfg


def _as_config(config, cls):
    return config if isinstance(config, cls) else cls.from_dict(dict(config))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias).

    Parameters:
        dim: model width; heads: number of heads (head_dim = dim // heads).
        dtype: compute dtype (None: the inputs' dtype); param_dtype: parameter dtype.
    """

    def __init__(self, dim: int, heads: int, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.attention_impl = "dot"  # layers.set_attention switches it
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = layers.linear(dim, dim, **kw)
        self.v_proj = layers.linear(dim, dim, **kw)
        self.q_proj = layers.linear(dim, dim, **kw)
        self.out_proj = layers.linear(dim, dim, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        q = layers.split_heads(self.q_proj(x), self.heads)  # (B, L, H, D)
        k = layers.split_heads(self.k_proj(x), self.heads)
        v = layers.split_heads(self.v_proj(x), self.heads)
        out = layers.attention(q, k, v, bias, self.scale, self.attention_impl)
        return self.out_proj(layers.merge_heads(out))  # (B, L, H*D)


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2.

    Parameters:
        dim, inner: widths; act: a transformers activation name ("gelu", "quick_gelu", ...).
        dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(
        self, dim: int, inner: int, act: str, *, dtype=None, param_dtype=jnp.float32, rngs
    ):
        self.act = act
        self.fc1 = layers.linear(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = layers.linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.get_activation(self.act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)).

    Parameters:
        config: a TextEncoderConfig or ImageEncoderConfig (widths, heads, activation, eps).
        dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, config, *, dtype=None, param_dtype=jnp.float32, rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads, **kw)
        self.layer_norm1 = layers.layer_norm(c.hidden_size, c.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, **kw)
        self.layer_norm2 = layers.layer_norm(c.hidden_size, c.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


@nnx.remat
def _remat_layer(layer: CLIPEncoderLayer, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return layer(x, bias)


class CLIPEncoder(nnx.Module):
    """A stack of CLIPEncoderLayer in `layers` (an nnx.List, so paths read `layers.N.`).

    Parameters:
        config: a TextEncoderConfig or ImageEncoderConfig.
        gradient_checkpointing: recompute each layer's activations in the backward pass.
        dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(
        self, config, *, gradient_checkpointing=False, dtype=None, param_dtype=jnp.float32, rngs
    ):
        self.gradient_checkpointing = gradient_checkpointing
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, **kw) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = _remat_layer(layer, x, bias) if self.gradient_checkpointing else layer(x, bias)
        return x


def _embed(num, dim, dtype, param_dtype, rngs):
    init = nnx.initializers.normal(0.02)
    init = initializers("embedding_init").get("embedding_init", init)
    return nnx.Embed(num, dim, dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    """token_embedding(ids) + position_embedding(0..L-1).

    Parameters:
        config: TextEncoderConfig; dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, config: TextEncoderConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        c = config
        self.token_embedding = _embed(c.vocab_size, c.hidden_size, dtype, param_dtype, rngs)
        self.position_embedding = _embed(
            c.max_position_embeddings, c.hidden_size, dtype, param_dtype, rngs
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextModel(nnx.Module):
    """Embeddings, causal pre-LN encoder, final LayerNorm, pooled row (transformers' text_model).

    Parameters:
        config: TextEncoderConfig; gradient_checkpointing: remat each encoder layer.
        dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(
        self, config, *, gradient_checkpointing=False, dtype=None, param_dtype=jnp.float32, rngs
    ):
        self.eos_token_id = config.eos_token_id
        self.max_positions = config.max_position_embeddings
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, gradient_checkpointing=gradient_checkpointing, **kw)
        self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """input_ids (B, L) int, L <= max_position_embeddings; attention_mask (B, L) 1 = keep.

        Returns (last_hidden_state (B, L, C), pooled (B, C)).
        """
        b, n = input_ids.shape
        if n > self.max_positions:
            raise ValueError(f"sequence length {n} exceeds max_position_embeddings")
        allowed = jnp.tril(jnp.ones((n, n), bool))[None]  # (1, Lq, Lk): key j <= query i
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, :] > 0)  # (B, Lq, Lk)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # (B|1, 1, Lq, Lk)
        h = self.final_layer_norm(self.encoder(self.embeddings(input_ids), bias))
        if self.eos_token_id == 2:
            # transformers' legacy path for old configs: the EOS id (49407) is the largest id, and
            # argmax returns its first occurrence.
            index = jnp.argmax(input_ids, axis=-1)
        else:
            index = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]  # (B, C)
        return h, pooled


class CLIPTextModelWithProjection(nnx.Module):
    """CLIP text tower + text_projection (no bias), as transformers' class of that name.

    Parameters:
        config: TextEncoderConfig or a transformers CLIPTextConfig dict.
        gradient_checkpointing: remat each encoder layer (pointless while frozen; kept uniform).
        dtype: compute dtype (None: fp32 here, from the params); param_dtype: parameter dtype.
    """

    def __init__(
        self, config, *, gradient_checkpointing=False, dtype=None, param_dtype=jnp.float32, rngs
    ):
        self.config = _as_config(config, TextEncoderConfig)
        c = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = CLIPTextModel(c, gradient_checkpointing=gradient_checkpointing, **kw)
        self.text_projection = layers.linear(c.hidden_size, c.projection_dim, use_bias=False, **kw)

    @classmethod
    def from_config(cls, config, **kwargs) -> CLIPTextModelWithProjection:
        return cls(config, **kwargs)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """input_ids (B, L) -> {"text_embeds": (B, P), "last_hidden_state": (B, L, C)}."""
        h, pooled = self.text_model(input_ids, attention_mask)
        return {"text_embeds": self.text_projection(pooled), "last_hidden_state": h}


class CLIPVisionEmbeddings(nnx.Module):
    """Patch conv (no bias) tokens after a class token, plus position embeddings.

    Parameters:
        config: ImageEncoderConfig; dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, config: ImageEncoderConfig, *, dtype=None, param_dtype=jnp.float32, rngs):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image_size = c.image_size
        self.class_embedding = nnx.Param(
            abstract.value(jax.random.normal, rngs.params, (c.hidden_size,), param_dtype)
        )
        self.patch_embedding = layers.conv2d(
            c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, use_bias=False, **kw
        )
        positions = (c.image_size // c.patch_size) ** 2 + 1
        self.position_embedding = _embed(positions, c.hidden_size, dtype, param_dtype, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, hgt, wid, _ = pixels.shape
        if (hgt, wid) != (self.image_size, self.image_size):
            raise ValueError(
                f"input image size ({hgt}*{wid}) doesn't match model "
                f"({self.image_size}*{self.image_size}); pixels are NHWC"
            )
        patches = self.patch_embedding(pixels)  # (B, g, g, C)
        patches = patches.reshape(b, -1, patches.shape[-1])  # (B, g*g, C), row-major like torch
        cls = jnp.broadcast_to(
            self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1])
        )
        tokens = jnp.concatenate([cls, patches], axis=1)  # (B, 1 + g*g, C)
        return tokens + self.position_embedding(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionModel(nnx.Module):
    """Embeddings, pre_layrnorm (sic), encoder, post_layernorm on the class token.

    Parameters:
        config: ImageEncoderConfig; gradient_checkpointing: remat each encoder layer.
        dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(
        self, config, *, gradient_checkpointing=False, dtype=None, param_dtype=jnp.float32, rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.encoder = CLIPEncoder(config, gradient_checkpointing=gradient_checkpointing, **kw)
        self.post_layernorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return h, self.post_layernorm(h[:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
    """CLIP vision tower + visual_projection (no bias), as transformers' class of that name.

    Input pixels are NHWC (B, image_size, image_size, num_channels), already CLIP-normalised;
    transformers takes the same values as NCHW (transpose (0, 2, 3, 1) to come here).

    Parameters:
        config: ImageEncoderConfig or a transformers CLIPVisionConfig dict.
        gradient_checkpointing: remat each encoder layer.
        dtype: compute dtype (None: fp32 here, from the params); param_dtype: parameter dtype.
    """

    def __init__(
        self, config, *, gradient_checkpointing=False, dtype=None, param_dtype=jnp.float32, rngs
    ):
        self.config = _as_config(config, ImageEncoderConfig)
        c = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_model = CLIPVisionModel(c, gradient_checkpointing=gradient_checkpointing, **kw)
        self.visual_projection = layers.linear(
            c.hidden_size, c.projection_dim, use_bias=False, **kw
        )

    @classmethod
    def from_config(cls, config, **kwargs) -> CLIPVisionModelWithProjection:
        return cls(config, **kwargs)

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """pixels (B, H, W, C) -> {"image_embeds": (B, P), "last_hidden_state": (B, 1+g*g, C)}."""
        h, pooled = self.vision_model(pixels)
        return {"image_embeds": self.visual_projection(pooled), "last_hidden_state": h}


# --- folders ----------------------------------------------------------------------------------

# class -> (transformers architecture, model_type, config class, conversion table)
_ARCH = {
    CLIPTextModelWithProjection: ("clip_text_model", TextEncoderConfig, TEXT_TABLE),
    CLIPVisionModelWithProjection: ("clip_vision_model", ImageEncoderConfig, VISION_TABLE),
}


def _load(cls, folder, dtype, param_dtype, gradient_checkpointing):
    config = folders.read_config(folder)
    _, config_cls, table = _ARCH[cls]
    parsed = config_cls.from_dict(config)  # validate before reading gigabytes of weights
    sd = clean_state_dict(folders.load_weights(folder))
    kw = dict(gradient_checkpointing=gradient_checkpointing, dtype=dtype, param_dtype=param_dtype)
    return pretrained.from_state_dict(lambda rngs: cls(parsed, rngs=rngs, **kw), table, sd), config


def load_text_encoder(
    folder: str | os.PathLike, dtype=None, param_dtype=jnp.float32, gradient_checkpointing=False
) -> tuple[CLIPTextModelWithProjection, dict]:
    """(model, config dict) from a transformers CLIPTextModelWithProjection folder."""
    return _load(CLIPTextModelWithProjection, folder, dtype, param_dtype, gradient_checkpointing)


def load_image_encoder(
    folder: str | os.PathLike, dtype=None, param_dtype=jnp.float32, gradient_checkpointing=False
) -> tuple[CLIPVisionModelWithProjection, dict]:
    """(model, config dict) from a transformers CLIPVisionModelWithProjection folder."""
    return _load(CLIPVisionModelWithProjection, folder, dtype, param_dtype, gradient_checkpointing)


def hf_config(model: nnx.Module, config: dict[str, Any], weights_dtype: str = "float32") -> dict:
    """`config` plus what transformers needs to load the folder (architectures, model_type, ...)."""
    model_type = _ARCH[type(model)][0]
    out = {**dataclasses.asdict(model.config), **config}
    out.pop("torch_dtype", None)  # stale after a dtype change; transformers 5 reads `dtype`
    out.update(architectures=[type(model).__name__], model_type=model_type, dtype=weights_dtype)
    return out


def _save(model, config, folder, dtype):
    cfg = hf_config(model, config, jnp.dtype(dtype or jnp.float32).name)
    table = _ARCH[type(model)][2]
    return pretrained.save_folder(
        model, table, cfg, folder, weights_name="model.safetensors", dtype=dtype
    )


def save_text_encoder(model: CLIPTextModelWithProjection, config: dict, folder, dtype=None):
    """Write config.json + model.safetensors for CLIPTextModelWithProjection.from_pretrained."""
    return _save(model, config, folder, dtype)


def save_image_encoder(model: CLIPVisionModelWithProjection, config: dict, folder, dtype=None):
    """Write config.json + model.safetensors for CLIPVisionModelWithProjection.from_pretrained."""
    return _save(model, config, folder, dtype)
