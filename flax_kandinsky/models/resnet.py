"""Residual blocks and resamplers shared by the UNet and MoVQ ports (diffusers resnet.py, NHWC).

Everything here is NHWC: (batch, height, width, channels). Attribute names are diffusers' names so
the conversion tables map keys one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_kandinsky.models.layers import conv2d, get_activation, group_norm, linear
from kandinsky_common.errors import UserError


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """F.interpolate(scale_factor=2, mode="nearest") on NHWC: (B,H,W,C) -> (B,2H,2W,C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x(x: jax.Array) -> jax.Array:
    """nn.AvgPool2d(2, 2) on NHWC; an odd trailing row/column is dropped, as torch floors."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(
        axis=(2, 4)
    )  # (B,H/2,2,W/2,2,C) -> (B,H/2,W/2,C)


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    # torch's legacy "nearest": src = min(floor(dst * (in/out)), in - 1), scale in float32.
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """F.interpolate(x, size=size, mode="nearest") on NHWC."""
    (h, w), (oh, ow) = x.shape[1:3], size
    if (h, w) == (oh, ow):
        return x
    if oh % h == 0 and ow % w == 0:
        return jnp.repeat(jnp.repeat(x, oh // h, axis=1), ow // w, axis=2)
    return x[:, _nearest_index(oh, h)][:, :, _nearest_index(ow, w)]


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution (diffusers Downsample2D with use_conv=True).

    Parameters:
        channels: input channels.
        out_channels: output channels (default: `channels`).
        padding: symmetric padding; 0 means diffusers' asymmetric pad (right 1, bottom 1) as
            used by the MoVQ encoder.
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        padding: int = 1,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv2d(
            channels,
            out_channels or channels,
            3,
            stride=2,
            padding=pad,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest x2 then a 3x3 convolution (diffusers Upsample2D with use_conv=True).

    Parameters:
        channels: input channels.
        out_channels: output channels (default: `channels`).
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = conv2d(
            channels,
            out_channels or channels,
            3,
            padding=1,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (pre-norm, optional time term and resampling).

    Parameters:
        in_channels: input channels.
        out_channels: output channels (default: `in_channels`); a 1x1 `conv_shortcut` is added
            when they differ.
        temb_channels: width of the time embedding, or None for no time term (MoVQ).
        groups, groups_out: GroupNorm groups of norm1 / norm2 (`groups_out` defaults to `groups`).
        eps: GroupNorm epsilon (UNet norm_eps 1e-5, MoVQ 1e-6).
        non_linearity: activation name ("silu", ...).
        time_embedding_norm: "default" (h + proj(temb) before norm2) or "scale_shift"
            (norm2(h) * (1 + scale) + shift; the first half of proj(temb) is the scale).
        skip_time_act: do not apply the activation to temb before `time_emb_proj`.
        output_scale_factor: the output is (shortcut + h) / output_scale_factor.
        up, down: nearest x2 upsampling / 2x2 average pooling of both streams after norm1.
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "silu",
        time_embedding_norm: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        up: bool = False,
        down: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if time_embedding_norm not in ("default", "scale_shift"):
            raise UserError(
                f"resnet_time_scale_shift {time_embedding_norm!r} is not supported by this port "
                "(use 'default' or 'scale_shift')"
            )
        out_channels = out_channels or in_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.up, self.down = up, down
        self.act = get_activation(non_linearity)
        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1, **kw)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            width = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = linear(temb_channels, width, **kw)
        self.norm2 = group_norm(out_channels, groups_out or groups, eps, **kw)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.act(self.norm1(x))
        if self.up:
            x, h = upsample_nearest_2x(x), upsample_nearest_2x(h)
        elif self.down:
            x, h = avg_pool_2x(x), avg_pool_2x(h)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            t = temb if self.skip_time_act else self.act(temb)
            t = self.time_emb_proj(t)[:, None, None, :]  # (B, C') -> (B, 1, 1, C')
            if self.time_embedding_norm == "scale_shift":
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        else:
            h = self.norm2(h)
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class SpatialNorm(nnx.Module):
    """MoVQ's spatially conditioned GroupNorm: norm(f) * conv_y(zq') + conv_b(zq').

    zq' is the quantized latent resized (nearest) to f's spatial size. The GroupNorm is fixed at
    32 groups and eps 1e-6, as in diffusers.

    Parameters:
        f_channels: channels of the normalised feature map.
        zq_channels: channels of the conditioning latent.
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    """

    def __init__(
        self,
        f_channels: int,
        zq_channels: int,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_layer = group_norm(f_channels, 32, 1e-6, **kw)
        self.conv_y = conv2d(zq_channels, f_channels, 1, **kw)
        self.conv_b = conv2d(zq_channels, f_channels, 1, **kw)

    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        zq = resize_nearest(zq, f.shape[1:3])
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlockCondNorm2D(nnx.Module):
    """diffusers ResnetBlockCondNorm2D with time_embedding_norm="spatial" (MoVQ decoder).

    Parameters:
        in_channels: input channels.
        out_channels: output channels (default: `in_channels`); 1x1 `conv_shortcut` if different.
        zq_channels: channels of the conditioning latent (diffusers' temb_channels).
        non_linearity: activation name.
        output_scale_factor: the output is (shortcut + h) / output_scale_factor.
        dtype, param_dtype, rngs: compute dtype, parameter dtype, initialisation keys.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        zq_channels: int,
        non_linearity: str = "silu",
        output_scale_factor: float = 1.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = out_channels or in_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = get_activation(non_linearity)
        self.output_scale_factor = output_scale_factor
        self.norm1 = SpatialNorm(in_channels, zq_channels, **kw)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.norm2 = SpatialNorm(out_channels, zq_channels, **kw)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, zq: jax.Array) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x, zq)))
        h = self.conv2(self.act(self.norm2(h, zq)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor
