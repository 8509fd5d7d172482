"""Models built as shapes only (`models.abstract`) are the trees `nnx.eval_shape` gives.

`pretrained.build_abstract` builds ShapeDtypeStruct leaves directly instead of tracing the
constructors under `nnx.eval_shape` (whose cost grows with the square of the layer count: every
RNG draw scans the trace so far). These checks hold it to the traced tree: the same graph
definition (module structure and static attributes), the same variable paths, types, shapes and
dtypes, for every network of both pipelines, in fp32 and bf16, with and without checkpointing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from flax_kandinsky.models.clip import (
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    ImageEncoderConfig,
    TextEncoderConfig,
)
from flax_kandinsky.models.movq import VQModel
from flax_kandinsky.models.prior import PriorConfig, PriorTransformer
from flax_kandinsky.models.unet import UNet2DConditionModel
from flax_kandinsky.pretrained import build_abstract
from kandinsky_common import folders


def _factories(prior_dir, decoder_dir, dtype, checkpointing):
    def cfg(path):
        return folders.read_config(path)

    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    text = TextEncoderConfig.from_dict(cfg(prior_dir / "text_encoder"))
    vision = ImageEncoderConfig.from_dict(cfg(prior_dir / "image_encoder"))
    prior = PriorConfig.from_dict(cfg(prior_dir / "prior"))
    ck = dict(gradient_checkpointing=checkpointing)
    return {
        "prior": lambda r: PriorTransformer(prior, rngs=r, **ck, **kw),
        "text_encoder": lambda r: CLIPTextModelWithProjection(text, rngs=r, **ck, **kw),
        "image_encoder": lambda r: CLIPVisionModelWithProjection(vision, rngs=r, **ck, **kw),
        "unet": lambda r: UNet2DConditionModel(cfg(decoder_dir / "unet"), rngs=r, **ck, **kw),
        "movq": lambda r: VQModel(cfg(decoder_dir / "movq"), rngs=r, **kw),
    }


def _leaves(model):
    graphdef, state = nnx.split(model)
    return graphdef, [
        (path, type(v).__name__, v.shape, v.dtype) for path, v in jax.tree.leaves_with_path(state)
    ]


@pytest.mark.parametrize("dtype,checkpointing", [(None, False), (jnp.bfloat16, True)])
def test_shapes_only_build_is_the_traced_tree(tiny_folders, dtype, checkpointing):
    prior_dir, decoder_dir = tiny_folders
    for name, factory in _factories(prior_dir, decoder_dir, dtype, checkpointing).items():
        built = build_abstract(factory)
        traced = nnx.eval_shape(lambda f=factory: f(nnx.Rngs(0)))
        g_built, built_leaves = _leaves(built)
        g_traced, traced_leaves = _leaves(traced)
        assert g_built == g_traced, name
        assert built_leaves == traced_leaves, name
        assert {kind for _, kind, _, _ in built_leaves} == {"ShapeDtypeStruct"}, name


def test_random_init_outside_shapes_only_is_unchanged(tiny_folders):
    """Outside the context the layers keep their own initializers: real, random values."""
    prior_dir, _ = tiny_folders
    vision = ImageEncoderConfig.from_dict(folders.read_config(prior_dir / "image_encoder"))
    model = CLIPVisionModelWithProjection(vision, rngs=nnx.Rngs(0))
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert float(jnp.std(model.vision_model.embeddings.class_embedding[...])) > 0.5
