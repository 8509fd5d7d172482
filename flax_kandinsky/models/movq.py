"""Flax NNX port of diffusers' VQModel as configured for Kandinsky 2.2 (MoVQ), NHWC.

- `encode(x)`: images (B, H, W, in_channels) in [-1, 1] -> latents (B, H/f, W/f, vq_embed_dim)
  with f = 2 ** (number of blocks - 1): encoder + quant_conv, no quantization, no scaling factor
  (exactly diffusers' `VQModel.encode(x).latents`, transposed to NHWC).
- `decode(h, force_not_quantize)`: latents -> images (B, H*f, W*f, out_channels). With
  `force_not_quantize=False` (diffusers' default) the latents are first snapped to their nearest
  codebook vector; Kandinsky 2.2 pipelines pass True.

Supported configs: norm_type "spatial" (MoVQ's SpatialNorm decoder), lookup_from_codebook False,
Down/AttnDownEncoderBlock2D and Up/AttnUpDecoderBlock2D blocks; anything else raises UserError.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flax_kandinsky.convert.movq import MOVQ_TABLE
from flax_kandinsky.models.abstract import initializers
from flax_kandinsky.models.layers import (
    attention,
    conv2d,
    get_activation,
    group_norm,
    linear,
    merge_heads,
    split_heads,
)
from flax_kandinsky.models.resnet import (
    Downsample2D,
    ResnetBlock2D,
    ResnetBlockCondNorm2D,
    SpatialNorm,
    Upsample2D,
)
from flax_kandinsky.pretrained import from_folder, save_folder
from kandinsky_common.errors import UserError

# diffusers VQModel.__init__ defaults (0.42.1).
MOVQ_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
DOWN_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
EPS = 1e-6  # every MoVQ GroupNorm (resnets, attention, conv_norm_out)


def resolve_movq_config(config: Mapping) -> dict:
    """diffusers defaults filled in, options outside the port rejected (UserError)."""
    cfg = {**MOVQ_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    def bad(option, why):
        return UserError(
            f"MoVQ config option {option}={cfg[option]!r} is not supported by the Flax port "
            f"({why}); use the Kandinsky 2.2 MoVQ layout or the torch backend"
        )

    if cfg["norm_type"] != "spatial":
        raise bad("norm_type", "only MoVQ's 'spatial' decoder norm is implemented")
    if cfg["lookup_from_codebook"]:
        raise bad("lookup_from_codebook", "only continuous latents are decoded")
    for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        for t in cfg[key]:
            if t.removeprefix("UNetRes") not in allowed:
                raise UserError(
                    f"MoVQ config {key} entry {t!r} is not supported by the Flax port; "
                    f"use {allowed}"
                )
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise UserError(
            "MoVQ config needs as many down_block_types and up_block_types as block_out_channels"
        )
    return cfg


class SelfAttention2D(nnx.Module):
    """diffusers Attention + AttnProcessor2_0 over the pixels of a feature map (VAE style).

    Either `group_norm` (encoder) or `spatial_norm` (decoder, conditioned on zq) normalises the
    input; the output projection is added back to the input (residual_connection=True).

    Parameters:
        channels: channels of the feature map; head_dim: head width (heads = channels //
            head_dim; MoVQ uses one head of width `channels`).
        norm_num_groups: GroupNorm groups (None: no group_norm); eps: its epsilon.
        zq_channels: channels of the decoder's conditioning latent (None: no spatial_norm).
        dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self,
        channels,
        *,
        head_dim,
        norm_num_groups=None,
        eps=EPS,
        zq_channels=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = channels // head_dim
        self.attention_impl = "dot"  # layers.set_attention switches it
        inner = self.heads * head_dim
        self.group_norm = (
            group_norm(channels, norm_num_groups, eps, **kw) if norm_num_groups else None
        )
        self.spatial_norm = SpatialNorm(channels, zq_channels, **kw) if zq_channels else None
        self.to_q = linear(channels, inner, **kw)
        self.to_k = linear(channels, inner, **kw)
        self.to_v = linear(channels, inner, **kw)
        self.to_out = nnx.List([linear(inner, channels, **kw)])

    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        residual = x
        if self.spatial_norm is not None:
            x = self.spatial_norm(x, zq)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # (B,H,W,C) -> (B,HW,C)
        if self.group_norm is not None:
            x = self.group_norm(x)
        q, k, v = (split_heads(p(x), self.heads) for p in (self.to_q, self.to_k, self.to_v))
        o = self.to_out[0](
            merge_heads(attention(q, k, v, impl=self.attention_impl))
        )  # (B,HW,heads,D) -> (B,HW,C)
        return o.reshape(b, h, w, c) + residual  # (B,HW,C) -> (B,H,W,C)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D / AttnDownEncoderBlock2D: resnets (each followed by an attention in the
    Attn variant), then an optional stride-2 `downsamplers[0]` (asymmetric pad).

    Parameters:
        in_channels, out_channels, num_layers, groups: block shape and GroupNorm groups.
        add_attention: the AttnDownEncoderBlock2D variant; add_downsample: end with Downsample2D.
        act: activation name. dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        num_layers,
        groups,
        add_attention,
        add_downsample,
        act,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=None,
                    groups=groups,
                    eps=EPS,
                    non_linearity=act,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            [
                SelfAttention2D(out_channels, head_dim=out_channels, norm_num_groups=groups, **kw)
                for _ in range(num_layers if add_attention else 0)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, out_channels, padding=0, **kw)])
            if add_downsample
            else None
        )

    def __call__(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if len(self.attentions):
                x = self.attentions[i](x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D / AttnUpDecoderBlock2D with spatial norms: ResnetBlockCondNorm2D resnets
    (each followed by a spatial-norm attention in the Attn variant), then an optional
    `upsamplers[0]` (nearest x2 + conv).

    Parameters:
        in_channels, out_channels, num_layers: block shape; zq_channels: conditioning width.
        add_attention, add_upsample: variant switches. act: activation name.
        dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        num_layers,
        zq_channels,
        add_attention,
        add_upsample,
        act,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlockCondNorm2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    zq_channels=zq_channels,
                    non_linearity=act,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = nnx.List(
            [
                SelfAttention2D(out_channels, head_dim=out_channels, zq_channels=zq_channels, **kw)
                for _ in range(num_layers if add_attention else 0)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x, zq):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if len(self.attentions):
                x = self.attentions[i](x, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nnx.Module):
    """UNetMidBlock2D: resnets[0], then [attentions[0]] -> resnets[1].

    Parameters:
        channels: block width; groups: GroupNorm groups (encoder); zq_channels: conditioning
            width (decoder: spatial-norm resnets and attention; None for the encoder).
        add_attention: mid_block_add_attention. act, dtype, param_dtype, rngs: as everywhere.
    """

    def __init__(
        self,
        channels,
        *,
        groups,
        zq_channels,
        add_attention,
        act,
        dtype=None,
        param_dtype=jnp.float32,
        rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if zq_channels is None:
            resnets = [
                ResnetBlock2D(
                    channels, temb_channels=None, groups=groups, eps=EPS, non_linearity=act, **kw
                )
                for _ in range(2)
            ]
            attn_kw = dict(norm_num_groups=groups)
        else:
            resnets = [
                ResnetBlockCondNorm2D(channels, zq_channels=zq_channels, non_linearity=act, **kw)
                for _ in range(2)
            ]
            attn_kw = dict(zq_channels=zq_channels)
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(
            [SelfAttention2D(channels, head_dim=channels, **attn_kw, **kw)] if add_attention else []
        )

    def __call__(self, x, zq=None):
        def run(m, x):
            return m(x) if zq is None else m(x, zq)

        x = run(self.resnets[0], x)
        if len(self.attentions):
            x = run(self.attentions[0], x)
        return run(self.resnets[1], x)


class Encoder(nnx.Module):
    """diffusers vae.Encoder with double_z=False: conv_in, down_blocks, mid_block, conv_norm_out,
    activation, conv_out. Parameters: the resolved MoVQ config `cfg`; dtype, param_dtype, rngs."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc, groups, act = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        n = len(boc)
        self.conv_in = conv2d(cfg["in_channels"], boc[0], 3, padding=1, **kw)
        blocks, out_ch = [], boc[0]
        for i, block_type in enumerate(cfg["down_block_types"]):
            in_ch, out_ch = out_ch, boc[i]
            blocks.append(
                EncoderBlock(
                    in_ch,
                    out_ch,
                    num_layers=cfg["layers_per_block"],
                    groups=groups,
                    add_attention=block_type.removeprefix("UNetRes") == "AttnDownEncoderBlock2D",
                    add_downsample=i < n - 1,
                    act=act,
                    **kw,
                )
            )
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(
            boc[-1],
            groups=groups,
            zq_channels=None,
            add_attention=cfg["mid_block_add_attention"],
            act=act,
            **kw,
        )
        self.conv_norm_out = group_norm(boc[-1], groups, EPS, **kw)
        self.conv_act = get_activation(act)
        self.conv_out = conv2d(boc[-1], cfg["latent_channels"], 3, padding=1, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers vae.Decoder with norm_type="spatial": conv_in, mid_block, up_blocks,
    conv_norm_out (SpatialNorm), activation, conv_out; every norm is conditioned on zq.
    Parameters: the resolved MoVQ config `cfg`; dtype, param_dtype, rngs."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc, act, zq_ch = cfg["block_out_channels"], cfg["act_fn"], cfg["latent_channels"]
        n = len(boc)
        self.conv_in = conv2d(zq_ch, boc[-1], 3, padding=1, **kw)
        self.mid_block = MidBlock(
            boc[-1],
            groups=None,
            zq_channels=zq_ch,
            add_attention=cfg["mid_block_add_attention"],
            act=act,
            **kw,
        )
        rev, blocks, out_ch = list(reversed(boc)), [], boc[-1]
        for i, block_type in enumerate(cfg["up_block_types"]):
            prev, out_ch = out_ch, rev[i]
            blocks.append(
                DecoderBlock(
                    prev,
                    out_ch,
                    num_layers=cfg["layers_per_block"] + 1,
                    zq_channels=zq_ch,
                    add_attention=block_type.removeprefix("UNetRes") == "AttnUpDecoderBlock2D",
                    add_upsample=i < n - 1,
                    act=act,
                    **kw,
                )
            )
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = SpatialNorm(boc[0], zq_ch, **kw)
        self.conv_act = get_activation(act)
        self.conv_out = conv2d(boc[0], cfg["out_channels"], 3, padding=1, **kw)

    def __call__(self, z, zq):
        x = self.mid_block(self.conv_in(z), zq)
        for block in self.up_blocks:
            x = block(x, zq)
        return self.conv_out(self.conv_act(self.conv_norm_out(x, zq)))


class VectorQuantizer(nnx.Module):
    """The MoVQ codebook (`embedding`, num_vq_embeddings x vq_embed_dim), nearest-vector lookup.

    Parameters: n_e codebook size, vq_embed_dim code width, dtype, param_dtype, rngs.
    """

    def __init__(self, n_e, vq_embed_dim, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.embedding = nnx.Embed(
            n_e,
            vq_embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            **initializers("embedding_init"),
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z (B,H,W,D) -> (z_q straight-through, codebook indices (B,H,W))."""
        codes = self.embedding.embedding[...].astype(z.dtype)  # (K, D)
        # Direct squared distances (not |z|^2 + |e|^2 - 2ze) so argmin matches torch.cdist.
        d = jnp.sum(jnp.square(z[..., None, :] - codes), axis=-1)  # (B,H,W,K)
        idx = jnp.argmin(d, axis=-1)
        z_q = codes[idx]
        return z + jax.lax.stop_gradient(z_q - z), idx


class VQModel(nnx.Module):
    """MoVQ (diffusers VQModel, norm_type "spatial"), NHWC.

    Parameters:
        config: a diffusers VQModel config dict; absent keys take diffusers' defaults; options
            outside the port raise UserError.
        dtype: compute dtype (None: fp32); param_dtype: parameter dtype (fp32).
        rngs: initialisation keys.
    """

    def __init__(self, config: Mapping, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = resolve_movq_config(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        latent = cfg["latent_channels"]
        vq_dim = cfg["vq_embed_dim"] or latent
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = conv2d(latent, vq_dim, 1, **kw)
        self.quantize = VectorQuantizer(cfg["num_vq_embeddings"], vq_dim, **kw)
        self.post_quant_conv = conv2d(vq_dim, latent, 1, **kw)
        self.decoder = Decoder(cfg, **kw)

    @classmethod
    def from_config(
        cls, config: Mapping, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ) -> VQModel:
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def encode(self, x: jax.Array) -> jax.Array:
        """(B,H,W,in_channels) -> latents (B,H/f,W/f,vq_embed_dim), unscaled, unquantized."""
        x = x.astype(self.dtype or x.dtype)
        return self.quant_conv(self.encoder(x))

    def decode(self, h: jax.Array, force_not_quantize: bool = False) -> jax.Array:
        """latents (B,h,w,vq_embed_dim) -> images (B,h*f,w*f,out_channels)."""
        h = h.astype(self.dtype or h.dtype)
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant), quant)

    def __call__(self, sample: jax.Array) -> jax.Array:
        """diffusers VQModel.forward: decode(encode(sample)) with quantization."""
        return self.decode(self.encode(sample))


def load_movq(folder, dtype=None, *, param_dtype=jnp.float32) -> tuple[VQModel, dict]:
    """(model, config) from a diffusers `movq/` folder (config.json + safetensors), strictly."""

    def factory(config, rngs):
        return VQModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    return from_folder(factory, MOVQ_TABLE, folder)


def save_movq(model: VQModel, config: Mapping, folder, dtype=None):
    """Write `folder` as diffusers' save_pretrained would (config.json with `_class_name`,
    diffusion_pytorch_model.safetensors in torch layout)."""
    out = {"_class_name": "VQModel", **resolve_movq_config(config)}
    return save_folder(model, MOVQ_TABLE, out, folder, dtype=dtype)
