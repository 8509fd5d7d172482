"""Shared Flax NNX building blocks with torch numerics (eps, exact GELU, fp32 softmax).

Flax defaults differ from torch (norm eps 1e-6, tanh GELU, fast variance): every constructor here
takes the eps explicitly and computes variance the torch way, so ports match diffusers to 1e-5.
All tensors are NHWC / (batch, tokens, features).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from flax_kandinsky.models.abstract import initializers
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


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose cotangent XLA must materialise.

    A residual stream's gradient is a long chain of cheap elementwise terms (every LayerNorm or
    GroupNorm backward adds some). XLA fuses such chains into each consumer instead of writing
    them once, so every layer's weight-gradient dot recomputed the chain from the output down:
    work quadratic in depth (a third of the small prior's backward on XLA:CPU).
    """
    return x


def _grad_barrier_fwd(x):
    return x, None


def _grad_barrier_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


class Linear(nnx.Linear):
    """nnx.Linear that may carry a LoRA adapter: `lora` (set by flax_kandinsky.lora.add_lora)
    adds its low-rank update to the output, as a PEFT LoRA layer does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nnx.data(None)  # data, not static: an adapter may be set later

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


def linear(din: int, dout: int, *, use_bias=True, dtype=None, param_dtype=jnp.float32, rngs):
    return Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **initializers("kernel_init", "bias_init"),
    )


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
        **initializers("kernel_init", "bias_init"),
    )


def layer_norm(dim: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs):
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **initializers("scale_init", "bias_init"),
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
        **initializers("scale_init", "bias_init"),
    )


ATTENTION_IMPLS = ("dot", "chunked")
# Query rows per block of the chunked kernel: the UNet's 48x48 level (2304 tokens) runs in 3
# blocks, MoVQ's 96x96 level (9216 tokens at 768 px) in 9.
QUERY_CHUNK = 1024
# Keys per block: beyond this the kernel also splits keys (online softmax). At 768 px no K2.2
# network attends over more than MoVQ's 9216 tokens: a query block's logits stay small
# (1024 x 9216 fp32 per head and sample), so only far longer sequences need key blocks.
KEY_CHUNK = 16384


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None = None,
    scale=None,
    impl: str = "dot",
) -> jax.Array:
    """Multi-head scaled dot-product attention, softmax in fp32 (diffusers' upcast_softmax).

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); bias: additive, broadcastable to (B, H, Lq, Lk).
    Returns (B, Lq, H, D) in q's dtype. impl "dot" materialises the (B, H, Lq, Lk) logits;
    "chunked" computes the same in blocks (`chunked_attention`), the xFormers counterpart.
    """
    if impl == "chunked":
        return chunked_attention(q, k, v, bias, scale)
    if impl != "dot":
        raise UserError(f"attention {impl!r} is not supported; use one of {ATTENTION_IMPLS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Heads move next to the batch before the dots and back after: with the transposes fused
    # into the dots instead, XLA:CPU left them off its matmul kernels (3x slower forward).
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, H, L, D)
    return jnp.swapaxes(_dot_attention(q, k, v, bias, scale), 1, 2)  # (B, Lq, H, D)


def _exp_logits(q, k, bias, scale):
    """exp(logits - rowmax) in fp32 and its row sums, (B, H, Lq, Lk) and (B, H, Lq, 1)."""
    # Scaling q, not the logits: XLA:CPU fed the logits' scale to its matmul fusion as a
    # materialised (B, H, Lq, Lk) broadcast.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    # The max only shifts the exponent: the result does not depend on it.
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e, jnp.sum(e, axis=-1, keepdims=True)


def _normalised_pv(e, total, v, dtype):
    # Normalise after the PV product, over D columns instead of Lk: the (B, H, Lq, Lk) tensor
    # is read and written fewer times (2-3x faster on XLA:CPU with short heads).
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(dtype)


def _dot_t(a, x):
    """einsum("bhqk,bhqd->bhkd", a, x), computed as the transpose of x^T a. XLA:CPU runs a dot
    that contracts a's second-minor axis on its slow generic emitter (4.5x slower than torch
    here); the barrier keeps XLA from folding the small output's transpose back into the dot."""
    out = jnp.einsum("bhqd,bhqk->bhdk", x, a, preferred_element_type=jnp.float32)
    return jnp.swapaxes(jax.lax.optimization_barrier(out), -1, -2)  # (B, H, Lk, D)


def _unbroadcast(x, shape):
    """Sum x over the axes along which an array of `shape` was broadcast to x's shape."""
    x = jnp.sum(x, axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dot_attention(q, k, v, bias, scale):
    """Softmax attention on (B, H, L, D) heads with a hand-written backward: autodiff of the
    forward gave XLA:CPU two slow transposed dots and several passes over the logits (the
    backward took 10x the forward; now 1.5x)."""
    return _dot_attention_fwd(q, k, v, bias, scale)[0]


def _dot_attention_fwd(q, k, v, bias, scale):
    e, total = _exp_logits(q, k, bias, scale)
    out = _normalised_pv(e, total, v, q.dtype)
    return out, (q, k, v, bias, e, total, out)


def _dot_attention_bwd(scale, res, g):
    q, k, v, bias, e, total, out = res
    f32 = jnp.float32
    inv = 1.0 / total  # (B, H, Lq, 1): P = e * inv
    # dV = P^T g; the 1/total folds into the small g instead of the (Lq, Lk) tensor.
    dv = _dot_t(e.astype(v.dtype), (g.astype(f32) * inv).astype(v.dtype))
    dp = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=f32)  # dO V^T
    rows = jnp.sum(g.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # rowsum(dO * O)
    ds = (dp - rows) * (e * inv)  # dS = P * (dP - rowsum(dO * O)): gradient of the logits
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), k, preferred_element_type=f32)
    dk = _dot_t(ds.astype(q.dtype), q)
    dbias = None if bias is None else _unbroadcast(ds, bias.shape).astype(bias.dtype)
    return (dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype), dbias


_dot_attention.defvjp(_dot_attention_fwd, _dot_attention_bwd)


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of about equal size, none longer than `chunk`."""
    parts = -(-n // chunk)
    size = -(-n // parts)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _bias_block(bias: jax.Array | None, axis: int, start: int, stop: int) -> jax.Array | None:
    """The rows (axis 2) or columns (axis 3) of a 4-d bias, unless broadcast along that axis."""
    if bias is None or bias.shape[axis] == 1:
        return bias
    return jax.lax.slice_in_dim(bias, start, stop, axis=axis)


def _online_softmax(q, k, v, bias, scale, key_chunk):
    """softmax(q k^T * scale + bias) v over key blocks, rescaling the running sum (flash style)."""
    b, lq, h, _ = q.shape
    m = jnp.full((b, h, lq), -jnp.inf, jnp.float32)  # running max of the logits
    total = jnp.zeros((b, h, lq), jnp.float32)  # running sum of exp(logits - m)
    acc = jnp.zeros((b, h, lq, v.shape[-1]), jnp.float32)  # running sum of exp(...) v

    def step(m, total, acc, kb, vb, bb):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kb).astype(jnp.float32) * scale
        if bb is not None:
            s = s + bb.astype(jnp.float32)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all -inf so far: keep exp finite
        p = jnp.exp(s - shift[..., None])
        keep = jnp.exp(m - shift)
        total = total * keep + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
        )
        return m_new, total, acc * keep[..., None] + pv

    # Recomputed in the backward pass, so it keeps one key block's probabilities, not all.
    step = jax.checkpoint(step)
    for k0, k1 in _spans(k.shape[1], key_chunk):
        m, total, acc = step(m, total, acc, k[:, k0:k1], v[:, k0:k1], _bias_block(bias, 3, k0, k1))
    out = acc / total[..., None]
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)  # (B,H,Lq,D) -> (B,Lq,H,D)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None = None,
    scale=None,
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """`attention` computed block by block (memory-efficient attention, Rabe & Staats 2021).

    Query blocks are independent rows of the same softmax, so with keys in one block each block
    is `attention` itself; past `key_chunk` keys a block walks the keys with an online softmax
    (equal to fp32 round-off). Each block is rematerialised in the backward pass: memory holds
    one (B, H, query_chunk, key_chunk) block of logits instead of all (B, H, Lq, Lk). Blocks are
    unrolled (no while loop), so XLA's cost analysis counts every block's flops.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)  # -> (B|1, H|1, Lq|1, Lk|1)
    lk = k.shape[1]

    def block(qb, k, v, bb):
        if lk <= key_chunk:
            return attention(qb, k, v, bb, scale)
        return _online_softmax(qb, k, v, bb, scale, key_chunk)

    spans = _spans(q.shape[1], query_chunk)
    if len(spans) == 1 and lk <= key_chunk:
        return attention(q, k, v, bias, scale)
    block = jax.checkpoint(block)
    outs = [block(q[:, q0:q1], k, v, _bias_block(bias, 2, q0, q1)) for q0, q1 in spans]
    return jnp.concatenate(outs, axis=1)


def set_attention(impl: str, *models: nnx.Module) -> None:
    """Use attention `impl` in every attention module (those with `attention_impl`) of `models`,
    as diffusers' `set_attn_processor`; it is static module state, so it is fixed at trace time.
    """
    if impl not in ATTENTION_IMPLS:
        raise UserError(f"--attention {impl!r} is not supported; use one of {ATTENTION_IMPLS}")
    for model in models:
        for _, module in nnx.iter_modules(model):
            if hasattr(module, "attention_impl"):
                module.attention_impl = impl


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
