"""Kandinsky 2.2 text-to-image in JAX: diffusers' KandinskyV22PriorPipeline and
KandinskyV22Pipeline, step for step, with each denoising loop one jitted `lax.fori_loop`.

Randomness: without injected arrays every row (prompt) r gets its own key `fold_in(key, r)`; its
initial latents use `fold_in(k_r, 0)` and the noise of step i `fold_in(k_r, i + 1)`, so a row's
draws depend on the seed and its position only, not on the batch size, the padding or the mesh.
Tests inject `latents` and per-step `noise` instead (rows of steps at t = 0 are ignored, as
diffusers draws none there).

Layouts are this package's: decoder latents and noise are NHWC, `(B, h, w, 4)` and
`(num_steps, B, h, w, 4)`; images come back as (B, H, W, 3) in [0, 1] or PIL images.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from flax_kandinsky import sharding as sh
from flax_kandinsky.models.clip import load_image_encoder, load_text_encoder
from flax_kandinsky.models.layers import set_attention
from flax_kandinsky.models.movq import load_movq
from flax_kandinsky.models.prior import load_prior
from flax_kandinsky.models.unet import load_unet
from flax_kandinsky.sampling.schedulers import (
    DDPMScheduler,
    UnCLIPScheduler,
    draw_normal,
    load_scheduler,
    prng_key,
    row_keys,
)
from kandinsky_common.errors import UserError
from kandinsky_common.folders import check_pipeline_folder
from kandinsky_common.preprocess import tokenize


def downscale_height_and_width(height: int, width: int, scale_factor: int = 8) -> tuple[int, int]:
    """Latent size for a pixel size, as diffusers: ceil(side / f**2) * f (pixels round up)."""
    return (
        math.ceil(height / scale_factor**2) * scale_factor,
        math.ceil(width / scale_factor**2) * scale_factor,
    )


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil."""
    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


def _as_prompts(prompts, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{what} must be a string or a non-empty list of strings")
    return prompts


def _check_array(x, shape: tuple[int, ...], what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape != shape:
        raise ValueError(f"{what} has shape {x.shape}, expected {shape}")
    return x


def _guidance(scale) -> float:
    scale = float(scale)
    if not math.isfinite(scale):
        raise UserError(f"guidance scale {scale} must be a finite number")
    return scale


class _Placement:
    """Pads the batch to a multiple of the mesh size and puts arrays on the mesh (if any)."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh
        self.multiple = 1 if mesh is None else mesh.size

    def padded(self, rows: int) -> int:
        return -(-rows // self.multiple) * self.multiple

    def pad(self, x, rows: int, axis: int = 0):
        """Repeat the last row along `axis` up to `rows` (the extra rows are dropped afterwards)."""
        if x is None or x.shape[axis] == rows:
            return x
        extra = np.repeat(np.take(x, [-1], axis=axis), rows - x.shape[axis], axis=axis)
        return np.concatenate([x, extra], axis=axis)

    def batch(self, x, leading: int = 0):
        """Split dim `leading` over the mesh; every process passes the same whole array."""
        if x is None or self.mesh is None:
            return None if x is None else jnp.asarray(x)
        if isinstance(x, jax.Array):
            x = np.asarray(x)
        sharding = sh.batch_sharding(self.mesh, leading)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def params(self, tree):
        """Weights as a pure dict of arrays (cheap to pass to a jitted call), placed on the mesh."""
        if isinstance(tree, nnx.State):
            tree = nnx.to_pure_dict(tree)
        if self.mesh is None:
            return tree
        return jax.device_put(tree, sh.tree_shardings(self.mesh, tree))

    def override(self, loaded, params, what: str):
        """`params` placed, if not None and its arrays have the names and shapes of `loaded`."""
        if params is None:
            return loaded
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        leaves = [jax.tree_util.tree_flatten_with_path(t)[0] for t in (loaded, params)]
        want, got = ({jax.tree_util.keystr(k): tuple(x.shape) for k, x in ls} for ls in leaves)
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))[:2]
            raise UserError(
                f"the {what} weights given do not fit the {what} of the pipeline folder (e.g. "
                f"{diff}); sample with the folder the network was trained from"
            )
        return self.params(params)

    @staticmethod
    def to_host(x: jax.Array, rows: int) -> np.ndarray:
        """The first `rows` rows as float32 numpy, gathered from every process if need be."""
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x, np.float32)[:rows]


class PriorPipeline:
    """Prompts -> CLIP image embeddings (and the negative embeddings), as diffusers'
    KandinskyV22PriorPipeline: CLIP text encoding (no attention mask, padded to 77), classifier-free
    guidance on the predicted x0 with "" or the negative prompt, UnCLIP steps, post_process_latents.

    Parameters:
        prior: the Flax PriorTransformer (its params may be overridden per call).
        text_encoder: Flax CLIPTextModelWithProjection.
        image_encoder: Flax CLIPVisionModelWithProjection (only for the zero-image negative).
        tokenizer: the prior folder's transformers CLIPTokenizer.
        scheduler: an UnCLIPScheduler.
        mesh: optional ("data", "fsdp") mesh; the batch is padded to a multiple of its size and
            split over both axes, weights follow sharding.py's rule.
    """

    def __init__(self, *, prior, text_encoder, image_encoder, tokenizer, scheduler, mesh=None):
        self.tokenizer = tokenizer
        self.scheduler: UnCLIPScheduler = scheduler
        self.place = _Placement(mesh)
        self.embedding_dim = prior.config.embedding_dim
        self._prior_graph, params, rest = nnx.split(prior, nnx.Param, ...)
        self.params, self._prior_rest = self.place.params(params), self.place.params(rest)
        text_graph, text_state = nnx.split(text_encoder)
        image_graph, image_state = nnx.split(image_encoder)
        self._text_state = self.place.params(text_state)
        self._image_state = self.place.params(image_state)
        side = image_encoder.config.image_size
        self._zero_pixels = jnp.zeros((1, side, side, image_encoder.config.num_channels))
        self._zero_embed = None
        self._encode_text = jax.jit(lambda st, ids: nnx.merge(text_graph, st)(ids))
        self._encode_image = jax.jit(lambda st, px: nnx.merge(image_graph, st)(px)["image_embeds"])
        self._loop = jax.jit(self._denoise, static_argnames=("cfg",))

    @classmethod
    def from_folder(cls, folder, *, dtype=None, mesh: Mesh | None = None) -> PriorPipeline:
        """From a KandinskyV22PriorPipeline folder; `dtype` is the compute dtype (params fp32)."""
        from transformers import CLIPTokenizer

        folder = check_pipeline_folder(str(folder), "prior", "--prior")
        scheduler = load_scheduler(folder / "scheduler")
        if not isinstance(scheduler, UnCLIPScheduler):
            raise UserError(f"{folder}/scheduler is not an UnCLIPScheduler; is it a prior folder?")
        return cls(
            prior=load_prior(folder / "prior", dtype=dtype)[0],
            text_encoder=load_text_encoder(folder / "text_encoder", dtype=dtype)[0],
            image_encoder=load_image_encoder(folder / "image_encoder", dtype=dtype)[0],
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            scheduler=scheduler,
            mesh=mesh,
        )

    def zero_image_embeds(self) -> np.ndarray:
        """image_encoder(all-zero pixels) (1, E): diffusers' get_zero_embed (raw zeros, not a
        normalised black image)."""
        if self._zero_embed is None:
            out = self._encode_image(self._image_state, self._zero_pixels)
            self._zero_embed = np.asarray(out, np.float32)
        return self._zero_embed

    def _denoise(self, params, rest, table, latents, keys, noise, text, guidance, *, cfg):
        prior = nnx.merge(self._prior_graph, params, rest)
        if latents is None:
            latents = draw_normal(keys, 0, (self.embedding_dim,))

        def body(i, x):
            row = jax.tree.map(lambda a: a[i], table)
            x_in = jnp.concatenate([x, x]) if cfg else x
            pred = prior(x_in, row["timestep"], text["embeds"], text["hidden"], text["mask"])
            pred = pred.astype(jnp.float32)
            if cfg:
                uncond, cond = jnp.split(pred, 2)
                pred = uncond + guidance * (cond - uncond)
            eps = draw_normal(keys, i + 1, x.shape[1:]) if noise is None else noise[i]
            return self.scheduler.step(row, pred, x, eps)

        x = jax.lax.fori_loop(0, table["timestep"].shape[0], body, latents.astype(jnp.float32))
        return prior.post_process_latents(x)

    def __call__(
        self,
        prompts,
        negative_prompt=None,
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        seed=0,
        latents=None,
        noise=None,
        params=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeds (B, E), negative_image_embeds (B, E)) as float32 numpy.

        negative_prompt: None (negatives = the zero-image embedding), a string for every prompt,
            or one string per prompt; as in diffusers, negative prompts run through the prior as
            extra rows (guided by themselves), and their embeddings are the negatives.
        seed: an int or a jax PRNG key. latents (R, E) and noise (num_steps, R, E), R = B or 2B
            with negative prompts, replace the random draws. params: prior params to use instead
            of the loaded ones (e.g. the network being trained).
        """
        prompts = _as_prompts(prompts, "prompt")
        b = len(prompts)
        negs = None
        if negative_prompt is not None:
            negs = _as_prompts(negative_prompt, "negative_prompt")
            negs = negs * b if len(negs) == 1 else negs
            if len(negs) != b:
                raise UserError(f"{len(negs)} negative prompts for {b} prompts; give 1 or {b}")
        rows = prompts + negs if negs else prompts
        r = len(rows)
        cfg = _guidance(guidance_scale) > 1.0
        table = self.scheduler.table(num_inference_steps)
        n = table["timestep"].shape[0]
        e = self.embedding_dim
        if latents is not None:
            latents = _check_array(latents, (r, e), "prior latents")
        if noise is not None:
            noise = _check_array(noise, (n, r, e), "prior noise")

        rp = self.place.padded(r)
        padded = rows + rows[-1:] * (rp - r)
        ids, mask = tokenize(self.tokenizer, padded)
        if cfg:
            uncond = negs * 2 if negs else [""] * r
            u_ids, u_mask = tokenize(self.tokenizer, uncond + uncond[-1:] * (rp - r))
            ids, mask = np.concatenate([u_ids, ids]), np.concatenate([u_mask, mask])
        out = self._encode_text(self._text_state, self.place.batch(ids))
        text = {
            "embeds": out["text_embeds"],
            "hidden": out["last_hidden_state"],
            "mask": self.place.batch(mask),
        }
        keys = None
        if latents is None or noise is None:
            keys = self.place.batch(row_keys(prng_key(seed), rp))
        x = self._loop(
            self.place.override(self.params, params, "prior"),
            self._prior_rest,
            table,
            self.place.batch(self.place.pad(latents, rp)),
            keys,
            self.place.batch(self.place.pad(noise, rp, axis=1), leading=1),
            text,
            jnp.float32(guidance_scale),
            cfg=cfg,
        )
        embeds = self.place.to_host(x, r)
        if negs:
            return embeds[:b], embeds[b:]
        return embeds, np.repeat(self.zero_image_embeds(), b, axis=0)


class DecoderPipeline:
    """Image embeddings -> images, as diffusers' KandinskyV22Pipeline: latents at
    `downscale_height_and_width`, guidance on the UNet's first 4 channels (the variance half is
    dropped unless the scheduler learns it), DDPM steps, MoVQ decode without quantization,
    `x * 0.5 + 0.5` clipped to [0, 1].

    Parameters:
        unet: the Flax UNet2DConditionModel (its params may be overridden per call).
        movq: the Flax VQModel.
        scheduler: a DDPMScheduler.
        mesh: optional ("data", "fsdp") mesh, as for PriorPipeline.
        attention: the UNet's and MoVQ's attention kernel (`layers.ATTENTION_IMPLS`). "chunked"
            (default) is "dot" itself up to `layers.QUERY_CHUNK` tokens and computes longer
            attentions block by block, where "dot" holds all the logits at once (the tiny test
            networks at 512 px: 65536 tokens, tens of GB). On CPU the blocks stay bounded only
            under `use_cpu_low_memory_schedule()`.
    """

    def __init__(self, *, unet, movq, scheduler, mesh=None, attention: str = "chunked"):
        # on copies (sharing the weights), so the caller's modules keep their own kernel
        unet, movq = (nnx.merge(*nnx.split(m)) for m in (unet, movq))
        set_attention(attention, unet, movq)
        self.scheduler: DDPMScheduler = scheduler
        # diffusers' movq_scale_factor: 2 ** (len(block_out_channels) - 1)
        self.scale_factor = 2 ** (len(movq.decoder.up_blocks) - 1)
        self.place = _Placement(mesh)
        self._unet_graph, params, rest = nnx.split(unet, nnx.Param, ...)
        self.params, self._unet_rest = self.place.params(params), self.place.params(rest)
        self._movq_graph, movq_state = nnx.split(movq)
        self._movq_state = self.place.params(movq_state)
        self.latent_channels = int(unet.conv_in.in_features)
        self._loop = jax.jit(self._denoise, static_argnames=("cfg", "shape", "decode"))

    @classmethod
    def from_folder(
        cls, folder, *, dtype=None, mesh: Mesh | None = None, attention: str = "chunked"
    ) -> DecoderPipeline:
        """From a KandinskyV22Pipeline folder; `dtype` is the compute dtype (params fp32),
        `attention` as for the constructor."""
        folder = check_pipeline_folder(str(folder), "decoder", "--decoder")
        scheduler = load_scheduler(folder / "scheduler")
        if not isinstance(scheduler, DDPMScheduler):
            raise UserError(f"{folder}/scheduler is not a DDPMScheduler; is it a decoder folder?")
        return cls(
            unet=load_unet(folder / "unet", dtype=dtype)[0],
            movq=load_movq(folder / "movq", dtype=dtype)[0],
            scheduler=scheduler,
            mesh=mesh,
            attention=attention,
        )

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """NHWC shape of the initial latents for images of (about) height x width pixels."""
        if height < 1 or width < 1:
            raise UserError(f"image size {height}x{width} must be positive")
        h, w = downscale_height_and_width(height, width, self.scale_factor)
        return (batch, h, w, self.latent_channels)

    def _denoise(
        self,
        params,
        rest,
        movq,
        table,
        latents,
        keys,
        noise,
        embeds,
        guidance,
        *,
        cfg,
        shape,
        decode,
    ):
        unet = nnx.merge(self._unet_graph, params, rest)
        c = self.latent_channels
        if latents is None:
            latents = draw_normal(keys, 0, shape)

        def body(i, x):
            row = jax.tree.map(lambda a: a[i], table)
            x_in = jnp.concatenate([x, x]) if cfg else x
            out = unet(x_in, row["timestep"], embeds).astype(jnp.float32)
            eps, var = out[..., :c], out[..., c:]
            if cfg:
                uncond, cond = jnp.split(eps, 2)
                eps = uncond + guidance * (cond - uncond)
                var = jnp.split(var, 2)[1]
            z = draw_normal(keys, i + 1, shape) if noise is None else noise[i]
            learned = var if self.scheduler.learned_variance else None
            return self.scheduler.step(row, eps, x, z, learned)

        x = jax.lax.fori_loop(0, table["timestep"].shape[0], body, latents.astype(jnp.float32))
        if not decode:
            return x
        images = nnx.merge(self._movq_graph, movq).decode(x, force_not_quantize=True)
        return jnp.clip(images.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)

    def __call__(
        self,
        image_embeds,
        negative_image_embeds=None,
        *,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        seed=0,
        latents=None,
        noise=None,
        params=None,
        output_type: str = "pil",
    ):
        """Images for image_embeds (B, E): a list of PIL images, (B, H, W, 3) numpy in [0, 1]
        with output_type "np", or the final latents (B, h, w, 4) with "latent".

        H, W = the latent size times the MoVQ factor (multiples of 64 for K2.2, rounded up).
        latents (B, h, w, 4) and noise (num_steps, B, h, w, 4), NHWC, replace the draws from
        `seed` (an int or PRNG key); params replace the loaded UNet params.
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type {output_type!r}: use 'pil', 'np' or 'latent'")
        embeds = np.asarray(image_embeds, np.float32)
        if embeds.ndim != 2:
            raise ValueError(f"image_embeds has shape {embeds.shape}, expected (batch, dim)")
        b = embeds.shape[0]
        cfg = _guidance(guidance_scale) > 1.0
        if cfg:
            if negative_image_embeds is None:
                raise UserError("guidance_scale > 1 needs negative_image_embeds")
            neg = _check_array(negative_image_embeds, embeds.shape, "negative_image_embeds")
        table = self.scheduler.table(num_inference_steps)
        n = table["timestep"].shape[0]
        shape = self.latent_shape(b, height, width)
        if latents is not None:
            latents = _check_array(latents, shape, "decoder latents")
        if noise is not None:
            noise = _check_array(noise, (n, *shape), "decoder noise")

        bp = self.place.padded(b)
        embeds = self.place.pad(embeds, bp)
        if cfg:
            embeds = np.concatenate([self.place.pad(neg, bp), embeds])
        keys = None
        if latents is None or noise is None:
            keys = self.place.batch(row_keys(prng_key(seed), bp))
        images = self._loop(
            self.place.override(self.params, params, "unet"),
            self._unet_rest,
            self._movq_state,
            table,
            self.place.batch(self.place.pad(latents, bp)),
            keys,
            self.place.batch(self.place.pad(noise, bp, axis=1), leading=1),
            self.place.batch(embeds),
            jnp.float32(guidance_scale),
            cfg=cfg,
            shape=shape[1:],
            decode=output_type != "latent",
        )
        images = self.place.to_host(images, b)
        return to_pil(images) if output_type == "pil" else images
