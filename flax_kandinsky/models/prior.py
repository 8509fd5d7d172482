"""Flax NNX port of diffusers' PriorTransformer, the Kandinsky 2.2 configuration.

Attribute paths equal the diffusers state-dict keys (`transformer_blocks.3.attn1.to_out.0`,
`ff.net.0.proj`, ...) with Flax leaf names; flax_kandinsky/convert/prior.py maps one to the other.
Options outside K2.2 (norm_in, embedding_proj_norm, other added/encoder embeddings, other widths)
are rejected when the config is read, so every model built here computes what diffusers computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from flax_kandinsky import pretrained
from flax_kandinsky.convert.prior import PRIOR_TABLE
from flax_kandinsky.models import abstract, layers
from kandinsky_common import folders
from kandinsky_common.errors import UserError

# diffusers PriorTransformer.__init__ defaults, for keys a config.json leaves out.
DEFAULTS = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "time_embed_dim": None,
    "embedding_proj_dim": None,
    "clip_embed_dim": None,
}
_SIZES = (
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "embedding_dim",
    "num_embeddings",
)
# The K2.2 subset: each option's one supported value (sizes that must equal a derived width are
# checked separately).
_FIXED = {
    "additional_embeddings": 4,  # encoder tokens + proj, time, x_t and prd tokens
    "dropout": 0.0,
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
}


@dataclass(frozen=True)
class PriorConfig:
    """The PriorTransformer sizes; everything else is fixed to the Kandinsky 2.2 values."""

    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    embedding_dim: int
    num_embeddings: int

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def additional_embeddings(self) -> int:
        return _FIXED["additional_embeddings"]

    @classmethod
    def from_dict(cls, config: dict) -> PriorConfig:
        unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
        if unknown:
            raise UserError(
                f"prior config: unknown option(s) {unknown}; is this a PriorTransformer?"
            )
        full = {**DEFAULTS, **config}
        for k in _SIZES:
            v = full[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"prior config: {k}={v!r} must be a positive integer")
        for k, want in _FIXED.items():
            if full[k] != want:
                raise UserError(
                    f"prior config: {k}={full[k]!r} is outside the Kandinsky 2.2 prior this port "
                    f"implements (needs {want!r})"
                )
        cfg = cls(**{k: full[k] for k in _SIZES})
        derived = {
            "time_embed_dim": cfg.inner_dim,
            "embedding_proj_dim": cfg.embedding_dim,
            "clip_embed_dim": cfg.embedding_dim,
        }
        for k, want in derived.items():
            if full[k] not in (None, want):
                raise UserError(
                    f"prior config: {k}={full[k]!r} differs from its derived default {want}; "
                    "the Kandinsky 2.2 prior this port implements needs null or that value"
                )
        return cfg

    def to_dict(self) -> dict:
        """Every diffusers option, as PriorTransformer's config.json spells it."""
        return {**DEFAULTS, **{k: getattr(self, k) for k in _SIZES}}


class ClipStats(nnx.Variable):
    """clip_mean / clip_std: frozen CLIP image-embedding statistics, not trained.

    Not an nnx.Param, so `nnx.state(model, nnx.Param)` (the trainable tree, optimizer and weight
    decay) leaves them out, while conversion and saving (all nnx.Variable) keep them.
    """


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding).

    Parameters:
        din, dim: input and output widths; dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, din: int, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.linear_1 = layers.linear(din, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = layers.linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GELU(nnx.Module):
    """proj -> exact (erf) GELU (diffusers' GELU, approximate="none").

    Parameters:
        din, dout: widths; dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, din: int, dout: int, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.proj = layers.linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.gelu(self.proj(x))


class FeedForward(nnx.Module):
    """net = [GELU(dim -> 4 dim), Dropout, Linear(4 dim -> dim)].

    The rate-0 Dropout keeps the list indices of diffusers' `ff.net`, so paths read `net.2`.

    Parameters:
        dim: width; dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List(
            [GELU(dim, 4 * dim, **kw), nnx.Dropout(0.0), layers.linear(4 * dim, dim, **kw)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for module in self.net:
            x = module(x)
        return x


class Attention(nnx.Module):
    """diffusers Attention (self-attention, biases): to_q, to_k, to_v, to_out = [Linear, Dropout].

    Parameters:
        dim: width; heads, head_dim: heads and their width (heads * head_dim == dim).
        dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, dim, heads, head_dim, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.heads = heads
        self.attention_impl = "dot"  # layers.set_attention switches it
        inner = heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = layers.linear(dim, inner, **kw)
        self.to_k = layers.linear(dim, inner, **kw)
        self.to_v = layers.linear(dim, inner, **kw)
        self.to_out = nnx.List([layers.linear(inner, dim, **kw), nnx.Dropout(0.0)])

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        q = layers.split_heads(self.to_q(x), self.heads)  # (B, L, H, D)
        k = layers.split_heads(self.to_k(x), self.heads)
        v = layers.split_heads(self.to_v(x), self.heads)
        out = layers.merge_heads(
            layers.attention(q, k, v, bias, impl=self.attention_impl)
        )  # (B, L, H*D)
        for module in self.to_out:
            out = module(out)
        return out


class BasicTransformerBlock(nnx.Module):
    """x + attn1(norm1(x)), then x + ff(norm3(x)); LayerNorm eps 1e-5 (no norm2/attn2).

    Parameters:
        dim, heads, head_dim: widths and heads; dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, dim, heads, head_dim, *, dtype=None, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layers.layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads, head_dim, **kw)
        self.norm3 = layers.layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = layers.grad_barrier(x + self.attn1(self.norm1(layers.grad_barrier(x)), bias))
        return x + self.ff(self.norm3(x))


@nnx.remat
def _remat_block(block: BasicTransformerBlock, x: jax.Array, bias: jax.Array | None):
    return block(x, bias)


class PriorTransformer(nnx.Module):
    """The Kandinsky 2.2 prior: CLIP text conditioning -> CLIP image embedding (x0 prediction).

    Parameters:
        config: a PriorConfig or a diffusers PriorTransformer config dict (validated: options
            outside K2.2 raise UserError).
        gradient_checkpointing: remat each transformer block (diffusers' prior cannot).
        dtype: compute dtype (None: fp32 here, from the params); param_dtype: parameter dtype.
    """

    def __init__(
        self, config, *, gradient_checkpointing=False, dtype=None, param_dtype=jnp.float32, rngs
    ):
        c = config if isinstance(config, PriorConfig) else PriorConfig.from_dict(dict(config))
        self.config = c
        self.gradient_checkpointing = gradient_checkpointing
        inner, emb = c.inner_dim, c.embedding_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(inner, inner, **kw)
        self.proj_in = layers.linear(emb, inner, **kw)
        self.embedding_proj = layers.linear(emb, inner, **kw)
        self.encoder_hidden_states_proj = layers.linear(emb, inner, **kw)
        seq = c.num_embeddings + c.additional_embeddings
        # diffusers initialises these four with zeros; real values come from the checkpoint.
        self.positional_embedding = nnx.Param(abstract.zeros((1, seq, inner), param_dtype))
        self.prd_embedding = nnx.Param(abstract.zeros((1, 1, inner), param_dtype))
        self.clip_mean = ClipStats(abstract.zeros((1, emb), param_dtype))
        self.clip_std = ClipStats(abstract.zeros((1, emb), param_dtype))
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(inner, c.num_attention_heads, c.attention_head_dim, **kw)
                for _ in range(c.num_layers)
            ]
        )
        self.norm_out = layers.layer_norm(inner, 1e-5, **kw)
        self.proj_to_clip_embeddings = layers.linear(inner, emb, **kw)

    @classmethod
    def from_config(cls, config, **kwargs) -> PriorTransformer:
        return cls(config, **kwargs)

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array | int | float,
        proj_embedding: jax.Array,
        encoder_hidden_states: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predicted image embedding (B, embedding_dim).

        hidden_states: x_t (B, E); timestep: scalar or (B,); proj_embedding: CLIP text_embeds
        (B, E); encoder_hidden_states: CLIP last_hidden_state (B, num_embeddings, E);
        attention_mask: text mask (B, num_embeddings), 1 = token. As in diffusers, the causal
        mask is applied only together with a text mask; without one, attention is unmasked.
        """
        c = self.config
        b = hidden_states.shape[0]
        if encoder_hidden_states.shape[1] != c.num_embeddings:
            raise ValueError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, the prior "
                f"was built for num_embeddings={c.num_embeddings}"
            )
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timestep), (-1,)), (b,))
        t_proj = layers.timestep_embedding(t, c.inner_dim, True, 0)  # (B, inner), fp32
        time_emb = self.time_embedding(t_proj)  # (B, inner)
        proj = self.embedding_proj(proj_embedding)  # (B, inner)
        enc = self.encoder_hidden_states_proj(encoder_hidden_states)  # (B, N, inner)
        x = self.proj_in(hidden_states)  # (B, inner)
        dt = x.dtype
        prd = jnp.broadcast_to(self.prd_embedding[...].astype(dt), (b, 1, c.inner_dim))
        extra = [proj[:, None], time_emb[:, None].astype(dt), x[:, None], prd]
        h = jnp.concatenate([enc.astype(dt)] + extra, axis=1)  # (B, N + 4, inner)
        h = h + self.positional_embedding[...].astype(dt)

        bias = None
        if attention_mask is not None:
            pad = (1.0 - attention_mask.astype(dt)) * -10000.0  # (B, N)
            pad = jnp.pad(pad, ((0, 0), (0, c.additional_embeddings)))  # (B, N + 4)
            n = pad.shape[1]
            causal = jnp.triu(jnp.full((n, n), -10000.0, jnp.float32), 1)  # key j > query i
            bias = (pad[:, None, :] + causal).astype(dt)[:, None]  # (B, 1, N+4, N+4)

        for block in self.transformer_blocks:
            h = _remat_block(block, h, bias) if self.gradient_checkpointing else block(h, bias)
        h = self.norm_out(h)
        return self.proj_to_clip_embeddings(h[:, -1])  # the prd token

    def post_process_latents(self, x: jax.Array) -> jax.Array:
        """Normalised embedding -> CLIP image-embedding scale: x * clip_std + clip_mean."""
        return x * self.clip_std[...].astype(x.dtype) + self.clip_mean[...].astype(x.dtype)


def load_prior(
    folder: str | os.PathLike, dtype=None, param_dtype=jnp.float32, gradient_checkpointing=False
) -> tuple[PriorTransformer, dict]:
    """(model, config dict) from a diffusers PriorTransformer folder (<prior pipeline>/prior)."""
    config = folders.read_config(folder)
    parsed = PriorConfig.from_dict(config)  # validate before reading gigabytes of weights

    def factory(rngs):
        return PriorTransformer(
            parsed,
            gradient_checkpointing=gradient_checkpointing,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    return pretrained.from_state_dict(factory, PRIOR_TABLE, folders.load_weights(folder)), config


def diffusers_config(model: PriorTransformer, config: dict) -> dict:
    """`config` plus every option diffusers records, with the class name."""
    return {**model.config.to_dict(), **config, "_class_name": "PriorTransformer"}


def save_prior(model: PriorTransformer, config: dict, folder: str | os.PathLike, dtype=None):
    """Write config.json + diffusion_pytorch_model.safetensors for diffusers' from_pretrained."""
    return pretrained.save_folder(
        model, PRIOR_TABLE, diffusers_config(model, config), folder, dtype=dtype
    )
