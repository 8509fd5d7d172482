"""Shared Flax NNX building blocks with torch numerics (eps, exact GELU, fp32 softmax).

Flax defaults differ from torch (norm eps 1e-6, tanh GELU, fast variance): every constructor here
takes the eps explicitly and computes variance the torch way, so ports match diffusers to 1e-5.
All tensors are NHWC / (batch, tokens, features).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kandinsky_common.errors import UserError


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {
    "gelu": gelu,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise UserError(f"activation {name!r} is not supported; use one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def linear(din: int, dout: int, *, use_bias=True, dtype=None, param_dtype=jnp.float32, rngs):
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conv2d(
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | tuple = 0,
    use_bias=True,
    dtype=None,
    param_dtype=jnp.float32,
    rngs,
):
    """torch.nn.Conv2d equivalent on NHWC input (symmetric integer padding or explicit pairs)."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(dim: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs):
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def group_norm(dim: int, groups: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs):
    return nnx.GroupNorm(
        dim,
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, scale=None
) -> jax.Array:
    """Multi-head scaled dot-product attention, softmax in fp32 (diffusers' upcast_softmax).

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); bias: additive, broadcastable to (B, H, Lq, Lk).
    Returns (B, Lq, H, D) in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads)  # (B, N, C) -> (B, N, H, D)


def merge_heads(x: jax.Array) -> jax.Array:
    b, n, h, d = x.shape
    return x.reshape(b, n, h * d)  # (B, N, H, D) -> (B, N, C)


def timestep_embedding(
    t: jax.Array, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, max_period=10000
) -> jax.Array:
    """diffusers' get_timestep_embedding, fp32: (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - downscale_freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
