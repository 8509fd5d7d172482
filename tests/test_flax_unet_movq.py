"""Pure-Flax checks of the UNet and MoVQ ports: config validation, folders, remat, dtypes, VQ."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_kandinsky.convert import ConversionError, to_torch_layout
from flax_kandinsky.convert.movq import MOVQ_TABLE
from flax_kandinsky.convert.unet import UNET_TABLE
from flax_kandinsky.models.movq import MOVQ_DEFAULTS, VQModel, load_movq, save_movq
from flax_kandinsky.models.resnet import avg_pool_2x, resize_nearest
from flax_kandinsky.models.unet import UNET_DEFAULTS, UNet2DConditionModel, load_unet, save_unet
from flax_kandinsky.pretrained import build_abstract
from kandinsky_common import folders
from kandinsky_common.errors import UserError
from kandinsky_common.model_configs import get_configs
from parity_tests.tolerances import TOLERANCES

UNET = get_configs("tiny")["unet"]
MOVQ = get_configs("tiny")["movq"]


def random_model(cls, config, seed=0, **kw):
    """A model filled with numpy draws (no per-parameter jax init, which compiles per shape)."""
    model = build_abstract(lambda rngs: cls(config, rngs=rngs, **kw))
    rng = np.random.default_rng(seed)

    def draw(path, v):
        z = rng.standard_normal(v.shape)
        if path[-1] == "scale":
            z = 1.0 + 0.1 * z
        elif path[-1] == "bias":
            z = 0.05 * z
        elif path[-1] == "kernel":  # fan-in scaling keeps activations O(1), as trained nets do
            z = z / np.sqrt(np.prod(v.shape[:-1]))
        return jnp.asarray(z, v.dtype)

    nnx.update(model, nnx.map_state(draw, nnx.state(model)))
    return model


def flat_params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize(
    "option,value",
    [
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("class_embeddings_concat", True),
        ("time_cond_proj_dim", 8),
        ("time_embedding_type", "fourier"),
        ("time_embedding_act_fn", "silu"),
        ("timestep_post_act", "silu"),
        ("addition_embed_type", "text"),
        ("encoder_hid_dim_type", "text_proj"),
        ("encoder_hid_dim", None),
        ("conv_in_kernel", 5),
        ("conv_out_kernel", 1),
        ("center_input_sample", True),
        ("only_cross_attention", True),
        ("only_cross_attention", [False, True]),
        ("mid_block_only_cross_attention", True),
        ("cross_attention_norm", "group_norm"),
        ("dual_cross_attention", True),
        ("upcast_attention", True),
        ("num_attention_heads", 8),
        ("attention_type", "gated"),
        ("dropout", 0.1),
        ("resnet_time_scale_shift", "ada_group"),
        ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]),
        ("up_block_types", ["SimpleCrossAttnUpBlock2D", "UpBlock2D"]),
        ("cross_attention_dim", [32, 32]),
        ("attention_head_dim", None),
    ],
)
def test_unet_rejects_options_outside_the_port(option, value):
    with pytest.raises(UserError, match=option):
        UNet2DConditionModel({**UNET, option: value}, rngs=nnx.Rngs(0))


def test_unet_absent_keys_take_diffusers_defaults():
    # diffusers' default blocks are CrossAttn ones: a config without block types is not K2.2.
    config = {k: v for k, v in UNET.items() if k != "down_block_types"}
    with pytest.raises(UserError, match="down_block_types"):
        UNet2DConditionModel(config, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="up_block_types"):
        UNet2DConditionModel(
            {**UNET, "up_block_types": UNET["up_block_types"][:1]}, rngs=nnx.Rngs(0)
        )


@pytest.mark.parametrize(
    "option,value",
    [
        ("norm_type", "group"),
        ("lookup_from_codebook", True),
        ("down_block_types", ["DownBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["AttnUpDecoderBlock2D", "UpBlock2D"]),
        ("block_out_channels", [32, 64, 64]),
    ],
)
def test_movq_rejects_options_outside_the_port(option, value):
    with pytest.raises(UserError, match=option):
        VQModel({**MOVQ, option: value}, rngs=nnx.Rngs(0))


def test_unet_folder_round_trip(tmp_path):
    model = random_model(UNet2DConditionModel, UNET, seed=1)
    save_unet(model, UNET, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "UNet2DConditionModel"
    assert set(UNET_DEFAULTS) <= set(saved) and saved["block_out_channels"] == [32, 64]
    loaded, config = load_unet(tmp_path)
    assert config == saved
    a, b = flat_params(model), flat_params(loaded)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_movq_folder_round_trip_in_half_precision(tmp_path):
    model = random_model(VQModel, MOVQ, seed=2)
    save_movq(model, MOVQ, tmp_path, dtype=np.float16)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "VQModel"
    assert {v.dtype for v in folders.load_weights(tmp_path).values()} == {np.dtype(np.float16)}
    loaded, _ = load_movq(tmp_path)
    a, b = flat_params(model), flat_params(loaded)
    assert "quantize.embedding.embedding" in b
    for k in a:  # params stay fp32, holding the fp16-rounded values
        assert b[k].dtype == np.float32
        np.testing.assert_array_equal(b[k], a[k].astype(np.float16).astype(np.float32))
    assert set(MOVQ_DEFAULTS) <= set(json.loads((tmp_path / "config.json").read_text()))


def test_loading_a_mismatched_folder_fails_loudly(tmp_path):
    model = random_model(UNet2DConditionModel, UNET)
    sd = to_torch_layout(model, UNET_TABLE)
    folders.write_json(tmp_path / "config.json", UNET)
    folders.save_weights(tmp_path, {k: v for k, v in sd.items() if "conv_out" not in k})
    with pytest.raises(ConversionError, match="missing"):
        load_unet(tmp_path)
    folders.save_weights(tmp_path, {**sd, "class_embedding.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match="class_embedding"):
        load_unet(tmp_path)


def test_movq_table_accepts_deprecated_attention_names():
    sd = to_torch_layout(random_model(VQModel, MOVQ), MOVQ_TABLE)
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    old = {}
    for k, v in sd.items():
        for new_name, old_name in renames.items():
            k = k.replace(new_name, old_name) if ".attentions." in k else k
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    a, b = MOVQ_TABLE.to_flax(sd), MOVQ_TABLE.to_flax(old)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(MOVQ_TABLE.to_torch(b)) == sorted(sd)  # written back in current naming


def test_gradient_checkpointing_gives_identical_outputs_and_grads():
    plain = random_model(UNet2DConditionModel, UNET, seed=3)
    remat = random_model(UNet2DConditionModel, UNET, seed=3, gradient_checkpointing=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    e = jnp.asarray(np.random.default_rng(1).standard_normal((1, 32)), jnp.float32)

    def value_and_grad(model):
        gd, state = nnx.split(model)

        def loss(st):
            out = nnx.merge(gd, st)(x, jnp.array([10]), e)
            return jnp.sum(out**2), out

        lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(state)
        (_, out), grads = lowered.compile()(state)
        flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        return lowered.as_text().count("optimization_barrier"), np.asarray(out), flat

    n0, out0, g0 = value_and_grad(plain)
    n1, out1, g1 = value_and_grad(remat)
    assert n1 > n0  # remat's barriers are in the compiled step (attention's backward has some)
    # Same math; only XLA's fusion of the recomputed graph may move the last fp32 bits.
    assert np.max(np.abs(out1 - out0)) <= TOLERANCES["forward"] * np.max(np.abs(out0))
    assert np.linalg.norm(g1 - g0) <= TOLERANCES["forward"] * np.linalg.norm(g0)


def test_bf16_compute_keeps_fp32_params():
    for cls, config in ((UNet2DConditionModel, UNET), (VQModel, MOVQ)):
        model = build_abstract(
            lambda rngs, c=cls, cfg=config: c(cfg, dtype=jnp.bfloat16, rngs=rngs)
        )
        dtypes = {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model))}
        assert dtypes == {jnp.dtype(jnp.float32)}
    fp32 = random_model(UNet2DConditionModel, UNET, seed=4)
    bf16 = random_model(UNet2DConditionModel, UNET, seed=4, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
    e = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32)), jnp.float32)
    t = jnp.array([1, 900])
    ref = nnx.jit(lambda m: m(x, t, e))(fp32)
    out = nnx.jit(lambda m: m(x, t, e))(bf16)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 8, 8)
    # The decoder's epsilon loss is where bf16 compute is judged (TOLERANCES["bf16_loss"]).
    noise = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 4)), jnp.float32)
    loss32, loss16 = (jnp.mean((o[..., :4].astype(jnp.float32) - noise) ** 2) for o in (ref, out))
    assert abs(float(loss16 / loss32) - 1.0) <= TOLERANCES["bf16_loss"]
    movq = random_model(VQModel, MOVQ, dtype=jnp.bfloat16)
    lat = jax.eval_shape(lambda m: m.encode(jnp.zeros((1, 16, 16, 3))), movq)
    assert lat.shape == (1, 8, 8, 4) and lat.dtype == jnp.bfloat16
    img = jax.eval_shape(lambda m: m.decode(jnp.zeros((1, 8, 8, 4)), True), movq)
    assert img.shape == (1, 16, 16, 3) and img.dtype == jnp.bfloat16


def test_vector_quantizer_picks_the_nearest_code_with_straight_through_grads():
    model = random_model(VQModel, MOVQ, seed=5)
    z = np.random.default_rng(6).standard_normal((2, 3, 5, 4)).astype(np.float32) * 0.3
    codes = np.asarray(model.quantize.embedding.embedding[...])
    want = np.argmin(((z[..., None, :] - codes) ** 2).sum(-1), axis=-1)
    z_q, idx = model.quantize(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_allclose(np.asarray(z_q), codes[want], rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(model.quantize(z)[0] * 3.0))(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(grad), 3.0)


def test_resamplers_follow_torch_index_rules():
    x = jnp.arange(2 * 5 * 7 * 3, dtype=jnp.float32).reshape(2, 5, 7, 3)
    pooled = np.asarray(avg_pool_2x(x))  # odd trailing row/column dropped, as AvgPool2d floors
    assert pooled.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(pooled[0, 0, 0], np.asarray(x[0, :2, :2].mean(axis=(0, 1))))
    # nearest to a non-multiple size: src = floor(dst * in / out)
    up = np.asarray(resize_nearest(x, (8, 10)))
    rows = np.floor(np.arange(8) * (5 / 8)).astype(int)
    cols = np.floor(np.arange(10) * (7 / 10)).astype(int)
    np.testing.assert_array_equal(up, np.asarray(x)[:, rows][:, :, cols])
    np.testing.assert_array_equal(
        np.asarray(resize_nearest(x, (10, 14))), np.asarray(x).repeat(2, 1).repeat(2, 2)
    )
