"""Flax-only checks of the CLIP and prior ports: configs, variables, folders, remat, dtypes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_kandinsky.convert import ConversionError, flat_state, to_torch_layout
from flax_kandinsky.convert.clip import TEXT_TABLE, VISION_TABLE, clean_state_dict
from flax_kandinsky.convert.prior import PRIOR_TABLE
from flax_kandinsky.models import clip, prior
from kandinsky_common.errors import UserError
from kandinsky_common.model_configs import get_configs
from parity_tests.tolerances import TOLERANCES

TINY = get_configs("tiny")
REAL = get_configs("real")


def max_rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def prior_inputs(batch=2, dim=32, n=77, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((batch, dim), np.float32)),
        jnp.asarray(rng.integers(0, 1000, batch)),
        jnp.asarray(rng.standard_normal((batch, dim), np.float32)),
        jnp.asarray(rng.standard_normal((batch, n, dim), np.float32)),
    )


def text_ids(batch=2, n=77, seed=0):
    ids = np.full((batch, n), 49407)
    ids[:, 0] = 49406
    ids[:, 1:6] = np.random.default_rng(seed).integers(0, 49406, (batch, 5))
    return jnp.asarray(ids)


def random_prior(seed=0, **kw):
    model = prior.PriorTransformer(TINY["prior"], rngs=nnx.Rngs(seed), **kw)
    # positional/prd/clip stats start at zero like diffusers; give them values worth checking
    key = jax.random.key(seed + 1)
    for i, var in enumerate(
        [model.positional_embedding, model.prd_embedding, model.clip_mean, model.clip_std]
    ):
        shape = var.get_value().shape
        var.set_value(jax.random.normal(jax.random.fold_in(key, i), shape, var.get_value().dtype))
    return model


@pytest.mark.parametrize(
    "option, value",
    [
        ("norm_in_type", "layer"),
        ("embedding_proj_norm_type", "layer"),
        ("added_emb_type", None),
        ("encoder_hid_proj_type", None),
        ("time_embed_act_fn", "gelu"),
        ("dropout", 0.1),
        ("additional_embeddings", 3),
        ("clip_embed_dim", 16),
        ("embedding_proj_dim", 16),
        ("time_embed_dim", 48),
        ("num_layers", 0),
        ("attention_head_dim", True),
        ("no_such_option", 1),
    ],
)
def test_prior_config_outside_k22_names_the_option(option, value):
    with pytest.raises(UserError, match=option):
        prior.PriorConfig.from_dict({**TINY["prior"], option: value})


def test_prior_config_accepts_published_and_derived_values():
    cfg = prior.PriorConfig.from_dict(REAL["prior"])
    assert (cfg.inner_dim, cfg.embedding_dim, cfg.num_layers) == (2048, 1280, 20)
    derived = {"clip_embed_dim": 1280, "embedding_proj_dim": 1280, "time_embed_dim": 2048}
    assert prior.PriorConfig.from_dict({**REAL["prior"], **derived}) == cfg
    assert prior.PriorConfig.from_dict({**cfg.to_dict(), "_class_name": "PriorTransformer"}) == cfg


@pytest.mark.parametrize(
    "which, change, match",
    [
        ("text_encoder", {"hidden_act": "relu6"}, "hidden_act"),
        ("text_encoder", {"num_attention_heads": 5}, "divisible"),
        ("text_encoder", {"model_type": "clip_vision_model"}, "model_type"),
        ("text_encoder", {"vocab_size": "big"}, "vocab_size"),
        ("image_encoder", {"patch_size": 15}, "patch_size"),
        ("image_encoder", {"layer_norm_eps": 0}, "layer_norm_eps"),
        ("image_encoder", {"model_type": "clip"}, "model_type"),
    ],
)
def test_clip_config_errors(which, change, match):
    cls = clip.TextEncoderConfig if which == "text_encoder" else clip.ImageEncoderConfig
    with pytest.raises(UserError, match=match):
        cls.from_dict({**TINY[which], **change})


def test_clip_config_defaults_are_transformers_defaults():
    cfg = clip.TextEncoderConfig.from_dict({})
    assert (cfg.hidden_size, cfg.eos_token_id, cfg.hidden_act) == (512, 49407, "quick_gelu")
    assert clip.ImageEncoderConfig.from_dict({}).patch_size == 32


def test_clip_stats_are_variables_but_not_params():
    model = random_prior()
    params = flat_state(model, nnx.Param)
    everything = flat_state(model, nnx.Variable)
    assert set(everything) - set(params) == {"clip_mean", "clip_std"}
    assert set(flat_state(model, prior.ClipStats)) == {"clip_mean", "clip_std"}
    x = jnp.ones((2, 32))
    want = x * everything["clip_std"] + everything["clip_mean"]
    np.testing.assert_array_equal(model.post_process_latents(x), want)


@pytest.mark.parametrize("kind", ["text", "vision", "prior"])
def test_torch_layout_round_trip_and_folder(kind, tmp_path):
    """flax -> torch layout -> flax is bit-exact; save_* then load_* restores every variable."""
    if kind == "text":
        model = clip.CLIPTextModelWithProjection(TINY["text_encoder"], rngs=nnx.Rngs(0))
        table, save, load = TEXT_TABLE, clip.save_text_encoder, clip.load_text_encoder
        config, weights = TINY["text_encoder"], "model.safetensors"
    elif kind == "vision":
        model = clip.CLIPVisionModelWithProjection(TINY["image_encoder"], rngs=nnx.Rngs(0))
        table, save, load = VISION_TABLE, clip.save_image_encoder, clip.load_image_encoder
        config, weights = TINY["image_encoder"], "model.safetensors"
    else:
        model = random_prior()
        table, save, load = PRIOR_TABLE, prior.save_prior, prior.load_prior
        config, weights = TINY["prior"], "diffusion_pytorch_model.safetensors"
    before = flat_state(model, nnx.Variable)
    flat = table.to_flax(to_torch_layout(model, table))
    assert sorted(flat) == sorted(before)
    assert all(np.array_equal(flat[k], v) for k, v in before.items())

    save(model, config, tmp_path)
    assert (tmp_path / weights).is_file()
    written = json.loads((tmp_path / "config.json").read_text())
    again, read = load(tmp_path)
    assert read == written
    after = flat_state(again, nnx.Variable)
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    if kind == "prior":
        assert written["_class_name"] == "PriorTransformer" and written["norm_in_type"] is None
    else:
        assert written["architectures"] == [type(model).__name__]
        assert written["model_type"] in ("clip_text_model", "clip_vision_model")
        assert written["dtype"] == "float32"


def test_legacy_position_ids_are_dropped_and_checked():
    model = clip.CLIPTextModelWithProjection(TINY["text_encoder"], rngs=nnx.Rngs(0))
    sd = to_torch_layout(model, TEXT_TABLE)
    legacy = {**sd, "text_model.embeddings.position_ids": np.arange(77)[None]}
    assert sorted(clean_state_dict(legacy)) == sorted(sd)
    with pytest.raises(ConversionError, match="position_ids"):
        clean_state_dict({**sd, "text_model.embeddings.position_ids": np.zeros((1, 77))})
    with pytest.raises(ConversionError, match="fit no rule"):
        TEXT_TABLE.to_flax({**sd, "text_model.embeddings.extra.weight": np.zeros(3)})


def test_loader_validates_config_before_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY["prior"], "norm_in_type": "layer"}))
    with pytest.raises(UserError, match="norm_in_type"):  # no weights file exists at all
        prior.load_prior(tmp_path)


def _prior_loss(model, inputs, mask):
    return jnp.sum(model(*inputs, mask) ** 2)


def test_gradient_checkpointing_same_outputs_and_grads():
    inputs = prior_inputs()
    mask = jnp.arange(77)[None] < jnp.array([[77], [30]])
    plain = random_prior()
    remat = random_prior(gradient_checkpointing=True)
    results = []
    for model in (plain, remat):
        loss, grads = nnx.jit(nnx.value_and_grad(_prior_loss))(model, inputs, mask)
        results.append((loss, jax.tree.leaves(grads)))
    for model, n in ((plain, 0), (remat, TINY["prior"]["num_layers"])):
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, g=graphdef: nnx.merge(g, s)(*inputs, mask))(state)
        assert str(jaxpr).count("remat") == n  # one checkpointed call per block, or none
    assert max_rel(results[1][0], results[0][0]) <= TOLERANCES["forward"]
    flat = [np.concatenate([g.ravel() for g in r[1]]) for r in results]
    assert rel_l2(flat[1], flat[0]) <= TOLERANCES["gradient"]

    ids = text_ids()
    text = [
        clip.CLIPTextModelWithProjection(
            {**TINY["text_encoder"], "num_hidden_layers": 2},  # 2 layers: remat per layer, fast
            gradient_checkpointing=flag,
            rngs=nnx.Rngs(0),
        )
        for flag in (False, True)
    ]
    grads = [nnx.jit(nnx.grad(lambda m: jnp.sum(m(ids)["text_embeds"] ** 2)))(m) for m in text]
    flat = [np.concatenate([g.ravel() for g in jax.tree.leaves(gr)]) for gr in grads]
    assert rel_l2(flat[1], flat[0]) <= TOLERANCES["gradient"]


def test_bf16_compute_keeps_fp32_params():
    inputs, ids = prior_inputs(), text_ids()
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((1, 224, 224, 3), np.float32))
    text, vision = TINY["text_encoder"], TINY["image_encoder"]
    cases = [
        (random_prior, lambda m: m(*inputs)),
        (
            lambda **kw: clip.CLIPTextModelWithProjection(text, rngs=nnx.Rngs(0), **kw),
            lambda m: m(ids)["text_embeds"],
        ),
        (
            lambda **kw: clip.CLIPVisionModelWithProjection(vision, rngs=nnx.Rngs(0), **kw),
            lambda m: m(pixels)["image_embeds"],
        ),
    ]
    for build, run in cases:
        ref, low = build(), build(dtype=jnp.bfloat16)
        assert {x.dtype for x in jax.tree.leaves(nnx.state(low))} == {jnp.dtype(jnp.float32)}
        out = nnx.jit(run)(low)
        assert out.dtype == jnp.bfloat16
        assert rel_l2(out.astype(jnp.float32), nnx.jit(run)(ref)) <= TOLERANCES["bf16_loss"]


def test_prior_text_mask_hides_padding_tokens():
    model = random_prior()
    x, t, proj, enc = prior_inputs(batch=1)
    mask = jnp.arange(77)[None] < 20
    other = enc.at[:, 20:].set(123.0)  # change only the padded tokens
    run = nnx.jit(lambda m, e, k: m(x, t, proj, e, k))
    np.testing.assert_array_equal(run(model, enc, mask), run(model, other, mask))
    # diffusers applies no mask at all without a text mask, so then the padding counts
    assert not np.allclose(run(model, enc, None), run(model, other, None))


def test_text_pools_first_eos_and_checks_shapes():
    config = {**TINY["text_encoder"], "eos_token_id": 49407}
    model = clip.CLIPTextModelWithProjection(config, rngs=nnx.Rngs(0))
    ids = text_ids(batch=1)
    out = model(ids)
    want = model.text_projection(out["last_hidden_state"][:, 6])  # row 6 holds the first EOS
    np.testing.assert_allclose(out["text_embeds"], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 78), jnp.int32))
    vision = clip.CLIPVisionModelWithProjection(TINY["image_encoder"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        vision(jnp.zeros((1, 3, 224, 224)))
    with pytest.raises(ValueError, match="num_embeddings"):
        random_prior()(*prior_inputs(n=76))
