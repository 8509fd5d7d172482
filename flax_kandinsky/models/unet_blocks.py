"""The Kandinsky 2.2 decoder UNet's blocks (diffusers unet_2d_blocks.py subset), NHWC.

Blocks: ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D, UNetMidBlock2DSimpleCrossAttn,
SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D, and the added-KV attention they share.
`remat=True` wraps every resnet and attention call in `nnx.remat` (gradient checkpointing;
see REMAT_POLICIES for what is kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_kandinsky.models.layers import attention, group_norm, linear, merge_heads, split_heads
from flax_kandinsky.models.resnet import ResnetBlock2D


def _apply(module, *args):
    return module(*args)


def _save_convs_and_projections(prim, *avals, **params) -> bool:
    if prim is jax.lax.conv_general_dilated_p:
        return True
    # Linear layers are dots without batch dimensions; attention's q k^T and p v have batch
    # dimensions and are not kept: their (B, H, Lq, Lk) intermediates are what remat saves.
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


# What a remat'd block keeps for the backward pass. "convs" (what True means): conv and linear
# outputs, so the backward pass recomputes only norms, activations and attention softmax; on a
# TPU v3-8 at 768 px this cut the step's flops 18% for 2% more memory (scripts/tpu_plan.py).
# "full": nothing, every op is recomputed (least memory).
REMAT_POLICIES = {True: _save_convs_and_projections, "convs": _save_convs_and_projections}
REMAT_POLICIES["full"] = None


def call(module, remat: bool | str, *args):
    """module(*args), recomputed in the backward pass when `remat` (activation checkpointing;
    a REMAT_POLICIES key)."""
    if not remat:
        return module(*args)
    return nnx.remat(_apply, policy=REMAT_POLICIES[remat])(module, *args)


class AddedKVAttention(nnx.Module):
    """diffusers Attention with AttnAddedKVProcessor2_0 (self-attention plus context tokens).

    The spatial stream is group-normed, then attends over [context tokens, spatial tokens]
    (context first); the output projection is added to the un-normed input (residual inside).

    Parameters:
        query_dim: channels of the spatial stream (= cross_attention_dim of to_k/to_v).
        heads: number of heads; head_dim: width of one head (inner dim = heads * head_dim).
        added_kv_proj_dim: width of the context tokens (the UNet's cross_attention_dim).
        norm_num_groups: groups of `group_norm` (its eps is diffusers' Attention default 1e-5).
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        added_kv_proj_dim: int,
        norm_num_groups: int,
        eps: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        self.heads = heads
        self.attention_impl = "dot"  # layers.set_attention switches it
        self.group_norm = group_norm(query_dim, norm_num_groups, eps, **kw)
        self.to_q = linear(query_dim, inner, **kw)
        self.to_k = linear(query_dim, inner, **kw)
        self.to_v = linear(query_dim, inner, **kw)
        self.add_k_proj = linear(added_kv_proj_dim, inner, **kw)
        self.add_v_proj = linear(added_kv_proj_dim, inner, **kw)
        self.to_out = nnx.List([linear(inner, query_dim, **kw)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        residual = x
        x = self.group_norm(x.reshape(b, h * w, c))  # (B,H,W,C) -> (B,HW,C)
        q = split_heads(self.to_q(x), self.heads)  # (B,HW,heads,D)
        k = jnp.concatenate([self.add_k_proj(context), self.to_k(x)], axis=1)  # (B,T+HW,inner)
        v = jnp.concatenate([self.add_v_proj(context), self.to_v(x)], axis=1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        o = attention(q, k, v, impl=self.attention_impl)
        o = self.to_out[0](merge_heads(o))  # (B,HW,heads,D) -> (B,HW,C)
        return o.reshape(b, h, w, c) + residual  # (B,HW,C) -> (B,H,W,C)


def _resnet(cin, cout, resnet_settings, kw, **extra):
    """A UNet ResnetBlock2D from the shared `resnet_settings` and dtype/rngs `kw`."""
    return ResnetBlock2D(cin, cout, **resnet_settings, **kw, **extra)


def _attn(channels, head_dim, cross_dim, resnet_settings, kw):
    # diffusers builds these with heads = channels // attention_head_dim, head width
    # attention_head_dim, group_norm over resnet_groups with Attention's default eps 1e-5.
    return AddedKVAttention(
        channels,
        heads=channels // head_dim,
        head_dim=head_dim,
        added_kv_proj_dim=cross_dim,
        norm_num_groups=resnet_settings["groups"],
        **kw,
    )


class ResnetDownsampleBlock2D(nnx.Module):
    """`num_layers` resnets, then (unless last) a ResnetBlock2D(down=True) as `downsamplers[0]`.

    Parameters:
        in_channels, out_channels: channels in and out.
        num_layers: resnets in the block.
        add_downsample: whether to end with the downsampling resnet.
        resnet_settings: shared ResnetBlock2D numerics (temb_channels, groups, eps, non_linearity,
            time_embedding_norm, skip_time_act, output_scale_factor).
        remat: gradient-checkpoint each resnet call.
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    Returns (hidden, skips) from __call__, skips = every resnet output and the downsampled output.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        num_layers,
        add_downsample,
        resnet_settings,
        remat=False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                _resnet(in_channels if i == 0 else out_channels, out_channels, resnet_settings, kw)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([_resnet(out_channels, out_channels, resnet_settings, kw, down=True)])
            if add_downsample
            else None
        )

    def __call__(self, x, temb, context=None):
        skips = []
        for resnet in self.resnets:
            x = call(resnet, self.remat, x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = call(self.downsamplers[0], self.remat, x, temb)
            skips.append(x)
        return x, skips


class SimpleCrossAttnDownBlock2D(nnx.Module):
    """`num_layers` x (resnet, added-KV attention), then (unless last) a downsampling resnet.

    Parameters:
        in_channels, out_channels, num_layers, add_downsample, resnet_settings, remat, dtype,
            param_dtype, rngs: as ResnetDownsampleBlock2D.
        head_dim: attention head width; heads = out_channels // head_dim (diffusers'
            attention_head_dim).
        cross_attention_dim: width of the context tokens.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        num_layers,
        add_downsample,
        head_dim,
        cross_attention_dim,
        resnet_settings,
        remat=False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                _resnet(in_channels if i == 0 else out_channels, out_channels, resnet_settings, kw)
                for i in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            [
                _attn(out_channels, head_dim, cross_attention_dim, resnet_settings, kw)
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([_resnet(out_channels, out_channels, resnet_settings, kw, down=True)])
            if add_downsample
            else None
        )

    def __call__(self, x, temb, context):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = call(resnet, self.remat, x, temb)
            x = call(attn, self.remat, x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = call(self.downsamplers[0], self.remat, x, temb)
            skips.append(x)
        return x, skips


class UNetMidBlock2DSimpleCrossAttn(nnx.Module):
    """resnets[0], then attentions[0] -> resnets[1] (diffusers' num_layers = 1).

    Parameters:
        channels: channels of the block; head_dim: attention head width (heads = channels //
            head_dim); cross_attention_dim: context width.
        resnet_settings, remat, dtype, param_dtype, rngs: as the down blocks.
    """

    def __init__(
        self,
        channels,
        *,
        head_dim,
        cross_attention_dim,
        resnet_settings,
        remat=False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [_resnet(channels, channels, resnet_settings, kw) for _ in range(2)]
        )
        self.attentions = nnx.List(
            [_attn(channels, head_dim, cross_attention_dim, resnet_settings, kw)]
        )

    def __call__(self, x, temb, context):
        x = call(self.resnets[0], self.remat, x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = call(attn, self.remat, x, context)
            x = call(resnet, self.remat, x, temb)
        return x


class ResnetUpsampleBlock2D(nnx.Module):
    """`num_layers` resnets over cat([h, skip]), then (unless last) an upsampling resnet.

    Parameters:
        in_channels: channels of the deepest skip this block consumes (its last resnet's skip).
        prev_output_channel: channels coming from the block below.
        out_channels, num_layers, resnet_settings, remat, dtype, param_dtype, rngs: as the down
            blocks.
        add_upsample: end with a ResnetBlock2D(up=True) as `upsamplers[0]`.
    """

    def __init__(
        self,
        in_channels,
        prev_output_channel,
        out_channels,
        *,
        num_layers,
        add_upsample,
        resnet_settings,
        remat=False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            cin = prev_output_channel if i == 0 else out_channels
            resnets.append(_resnet(cin + skip, out_channels, resnet_settings, kw))
        self.resnets = nnx.List(resnets)
        self.upsamplers = (
            nnx.List([_resnet(out_channels, out_channels, resnet_settings, kw, up=True)])
            if add_upsample
            else None
        )

    def __call__(self, x, skips, temb, context=None):
        for resnet in self.resnets:
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # channels: [h, skip]
            x = call(resnet, self.remat, x, temb)
        if self.upsamplers is not None:
            x = call(self.upsamplers[0], self.remat, x, temb)
        return x


class SimpleCrossAttnUpBlock2D(nnx.Module):
    """`num_layers` x (resnet over cat([h, skip]), added-KV attention), then an upsampler.

    Parameters:
        in_channels, prev_output_channel, out_channels, num_layers, add_upsample,
            resnet_settings, remat, dtype, param_dtype, rngs: as ResnetUpsampleBlock2D.
        head_dim: attention head width (heads = out_channels // head_dim).
        cross_attention_dim: context width.
    """

    def __init__(
        self,
        in_channels,
        prev_output_channel,
        out_channels,
        *,
        num_layers,
        add_upsample,
        head_dim,
        cross_attention_dim,
        resnet_settings,
        remat=False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            cin = prev_output_channel if i == 0 else out_channels
            resnets.append(_resnet(cin + skip, out_channels, resnet_settings, kw))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(
            [
                _attn(out_channels, head_dim, cross_attention_dim, resnet_settings, kw)
                for _ in range(num_layers)
            ]
        )
        self.upsamplers = (
            nnx.List([_resnet(out_channels, out_channels, resnet_settings, kw, up=True)])
            if add_upsample
            else None
        )

    def __call__(self, x, skips, temb, context):
        for resnet, attn in zip(self.resnets, self.attentions):
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # channels: [h, skip]
            x = call(resnet, self.remat, x, temb)
            x = call(attn, self.remat, x, context)
        if self.upsamplers is not None:
            x = call(self.upsamplers[0], self.remat, x, temb)
        return x
