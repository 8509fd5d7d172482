"""The TPU plan (flax_kandinsky/tpu_plan.py, scripts/tpu_plan.py) and its chunked attention.

The attention tests run on CPU in fp32 at highest matmul precision: the chunked kernel must equal
the dot kernel to round-off, masks and biases included, values and gradients. The plan tests
compile tiny configs for a TPU v3-8 with libtpu (the `tpu` extra) and skip without it; real sizes
take minutes per compile and stay in scripts/tpu_plan.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_kandinsky.models import layers
from flax_kandinsky.models.prior import PriorTransformer
from kandinsky_common.errors import UserError
from kandinsky_common.model_configs import get_configs

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _qkv(b=2, lq=37, lk=45, h=3, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, lq, h, d))
    k = jax.random.normal(ks[1], (b, lk, h, d))
    v = jax.random.normal(ks[2], (b, lk, h, d))
    return q, k, v


def _biases(b, lq, lk):
    """The kinds of bias the ports pass: none, prior-style padding + causal (-10000), CLIP-style
    finfo.min (1, 1, Lq, Lk), a (B, Lk) key mask as (B, 1, 1, Lk), and a mask whose first keys
    are all hidden (a fully masked first key block)."""
    rng = np.random.default_rng(0)
    pad = np.where(rng.random((b, lk)) < 0.3, -10000.0, 0.0)
    causal = np.triu(np.full((lq, lk), -10000.0), 1)
    clip = np.where(np.tril(np.ones((lq, lk), bool)), 0.0, np.finfo(np.float32).min)
    hidden_first = np.zeros((b, 1, 1, lk))
    hidden_first[..., :20] = np.finfo(np.float32).min
    return {
        "none": None,
        "prior": jnp.asarray(pad[:, None, None, :] + causal, jnp.float32),
        "clip": jnp.asarray(clip[None, None], jnp.float32),
        "keys": jnp.asarray(pad[:, None, :][:, None], jnp.float32),
        "hidden_first": jnp.asarray(hidden_first, jnp.float32),
    }


@pytest.mark.parametrize("bias", ["none", "prior", "clip", "keys", "hidden_first", "learned"])
def test_dot_attention_backward_equals_autodiff(bias):
    """The dot kernel's hand-written backward against autodiff of jax.nn.dot_product_attention:
    gradients of q, k, v and of the bias (summed over the axes it was broadcast along)."""
    q, k, v = _qkv()
    biases = _biases(2, 37, 45)
    biases["learned"] = jax.random.normal(jax.random.key(2), (2, 1, 37, 45))
    bias_ = biases[bias]
    w = jax.random.normal(jax.random.key(1), q.shape)

    def grads(fn):
        args = (q, k, v) if bias_ is None else (q, k, v, bias_)
        loss = lambda *a: jnp.sum(fn(*a) * w)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)

    (want, g_want), (got, g_got) = grads(jax.nn.dot_product_attention), grads(layers.attention)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_dot_attention_backward_bf16():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv())
    w = jax.random.normal(jax.random.key(1), q.shape)

    def grads(fn, dtype):
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

    want = grads(jax.nn.dot_product_attention, jnp.float32)
    for a, b in zip(grads(layers.attention, jnp.bfloat16), want):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=0.05, rtol=0.05)


# key_chunk 4096: every query block is the dot kernel; 16: online softmax over 3 key blocks.
@pytest.mark.parametrize(
    "bias, key_chunk",
    [
        ("none", 4096),
        ("prior", 4096),
        ("prior", 16),
        ("clip", 16),
        ("keys", 16),
        ("hidden_first", 16),
    ],
)
def test_chunked_attention_equals_dot(bias, key_chunk):
    q, k, v = _qkv()
    bias_ = _biases(2, 37, 45)[bias]
    w = jax.random.normal(jax.random.key(1), q.shape)

    @jax.jit
    def value_and_grads(q, k, v, bias_):
        def both(q, k, v):
            want = layers.attention(q, k, v, bias_)
            got = layers.chunked_attention(q, k, v, bias_, query_chunk=8, key_chunk=key_chunk)
            return want, got

        (want, got), vjp = jax.vjp(both, q, k, v)
        return want, got, vjp((w, jnp.zeros_like(w))), vjp((jnp.zeros_like(w), w))

    want, got, g_want, g_got = value_and_grads(q, k, v, bias_)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_want):  # d/d(q, k, v) of sum(out * w)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_chunked_attention_bf16_and_scale():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(lq=40, lk=40))
    want = layers.attention(q, k, v, None, 0.3)
    got = layers.attention(q, k, v, None, 0.3, impl="chunked")
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    # defaults: 40 tokens fit one block, so "chunked" is the dot kernel itself
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    split = layers.chunked_attention(q, k, v, None, 0.3, query_chunk=16, key_chunk=16)
    np.testing.assert_allclose(
        np.asarray(split, np.float32), np.asarray(want, np.float32), atol=2e-2
    )


def test_set_attention_switches_a_model():
    cfg = get_configs("tiny")["prior"]
    model = PriorTransformer(cfg, rngs=nnx.Rngs(0))
    b, e = 2, model.config.embedding_dim
    ks = jax.random.split(jax.random.key(0), 3)
    args = (
        jax.random.normal(ks[0], (b, e)),
        jnp.array([3, 500]),
        jax.random.normal(ks[1], (b, e)),
        jax.random.normal(ks[2], (b, model.config.num_embeddings, e)),
        jnp.ones((b, model.config.num_embeddings), bool).at[0, 40:].set(False),
    )
    want = model(*args)
    layers.set_attention("chunked", model)
    impls = {m.attention_impl for _, m in nnx.iter_modules(model) if hasattr(m, "attention_impl")}
    assert impls == {"chunked"}
    np.testing.assert_allclose(np.asarray(model(*args)), np.asarray(want), atol=1e-5)
    with pytest.raises(UserError, match="attention"):
        layers.set_attention("flash", model)


def test_collective_bytes_reads_hlo():
    from flax_kandinsky.tpu_plan import collective_bytes

    hlo = """
  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), replica_groups=[1,8]<=[8]
  %ags = (f32[16]{0}, f32[128]{0}) all-gather-start(f32[16]{0} %x), dimensions={0}
  %ar = f32[256]{0} all-reduce(f32[256]{0} %g), to_apply=%add
  %rs = f32[32,4]{1,0} reduce-scatter(f32[256,4]{1,0} %y), dimensions={0}
  %add.1 = f32[256]{0} add(f32[256]{0} %a, f32[256]{0} %b)
"""
    assert collective_bytes(hlo) == {
        "all-gather": 8 * 1024 * 2 + 128 * 4,
        "all-reduce": 256 * 4,
        "reduce-scatter": 32 * 4 * 4,
    }


needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")


@needs_libtpu
def test_plan_compiles_tiny_prior_for_v3_8(tmp_path):
    """The CLI end to end on a tiny config: a TPU v3-8 compile, its report and JSON."""
    from scripts.tpu_plan import main

    code = main(
        [
            "--size", "tiny", "--stages", "prior", "--slices", "v3-8", "--feedings", "cache",
            "--batch_per_core", "prior=4", "--output_dir", str(tmp_path), "--in_process",
            "--search", "--search_limit", "prior=64,prior:cache=0",  # stage:feeding wins
        ]
    )  # fmt: skip
    assert code == 0
    (entry,) = json.loads((tmp_path / "v3-8.json").read_text())["plans"]
    assert "max_batch_per_core" not in entry
    r = entry["result"]
    assert entry["spec"]["stage"] == "prior" and entry["spec"]["feeding"] == "cache"
    assert r["fits"] and r["mesh"] == {"data": 1, "fsdp": 8} and r["global_batch"] == 32
    assert 0 < r["bytes"]["total"] < 2**30
    assert r["hlo_flops"] >= r["model_flops"] > 0  # remat recomputes, never saves flops
    assert r["est_seconds"] > 0 and 0 < r["mfu"] <= 1
    assert "| prior | v3-8 (1x8) | cache | 4 |" in (tmp_path / "table.md").read_text()
    # Another slice into the same folder: its JSON joins, and table.md shows both.
    args = ["--size", "tiny", "--stages", "prior", "--slices", "v3-32", "--feedings", "cache"]
    assert main([*args, "--output_dir", str(tmp_path), "--in_process"]) == 0
    text = (tmp_path / "table.md").read_text()
    assert "| prior | v3-8 (1x8) | cache |" in text and "| prior | v3-32 (4x8) | cache |" in text


def test_plan_cli_flag_errors(capsys):
    from scripts.tpu_plan import main

    assert main(["--batch_per_core", "prior:8"]) == 2
    assert "prior=VALUE" in capsys.readouterr().err


def test_unet_remat_policies_keep_convs_or_recompute_them():
    """True (the "convs" policy) keeps conv outputs: the backward pass recomputes no conv, as
    without remat; "full" recomputes every one (tests/test_flax_unet_movq.py checks values)."""
    from flax_kandinsky.models.unet import UNet2DConditionModel
    from flax_kandinsky.pretrained import build_abstract

    cfg = get_configs("tiny")["unet"]
    x, e = (
        jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32),
        jax.ShapeDtypeStruct((1, 32), jnp.float32),
    )

    def convolutions(remat) -> int:
        model = build_abstract(
            lambda rngs: UNet2DConditionModel(cfg, gradient_checkpointing=remat, rngs=rngs)
        )
        gd, state = nnx.split(model)

        def loss(st, x, e):
            return jnp.sum(nnx.merge(gd, st)(x, jnp.array([10]), e) ** 2)

        return jax.jit(jax.grad(loss)).lower(state, x, e).as_text().count("convolution")

    plain, convs, full = (convolutions(r) for r in (False, True, "full"))
    assert convs == plain < full


@pytest.mark.parametrize("hint", [None, 40, 45])
def test_max_batch_finds_the_edge_in_few_compiles(monkeypatch, hint):
    """A memory curve that bends (XLA's choices change with the batch): the search still lands
    on the exact edge, and in a handful of compiles (each takes minutes at real size)."""
    from flax_kandinsky import tpu_plan as plan
    from flax_kandinsky import tpu_plan_search as plan_search

    def fake_compile(spec):
        b = spec.batch_per_core
        total = int((2.0 + 0.3 * b + 0.002 * b * b) * plan.GIB)
        return {"batch_per_core": b, "fits": total <= plan.HBM_BYTES, "bytes": {"total": total}}

    monkeypatch.setattr(plan_search, "compile_step", fake_compile)
    edge = max(
        b for b in range(1, 100) if fake_compile(plan.PlanSpec("prior", batch_per_core=b))["fits"]
    )
    first = fake_compile(plan.PlanSpec("prior", batch_per_core=8))
    best, tried = plan_search.max_batch(
        plan.PlanSpec("prior", batch_per_core=8), first, 512, hint, log=str
    )
    assert best == edge and len(tried) <= 6
    best, _ = plan_search.max_batch(
        plan.PlanSpec("prior", batch_per_core=8), first, 20, hint, log=str
    )
    assert best == 20  # the limit caps the search


def test_max_batch_reads_what_a_failed_compile_needed(monkeypatch):
    """A compile out of HBM reports only the memory it needed; the search draws its line through
    that, so a flat start (two fits with equal memory) does not send it bisecting from the limit."""
    from flax_kandinsky import tpu_plan as plan
    from flax_kandinsky import tpu_plan_search as plan_search

    def fake_compile(spec):
        b = spec.batch_per_core
        total = (4.5 + (0.16 * b if b > 17 else 0.1 * 16)) * plan.GIB
        if total <= plan.HBM_BYTES:
            return {"batch_per_core": b, "fits": True, "bytes": {"total": int(total)}}
        msg = f"RESOURCE_EXHAUSTED: ... HLO temporaries ({total / plan.GIB:.2f}G) exceeds ..."
        return {"batch_per_core": b, "fits": False, "error": msg}

    monkeypatch.setattr(plan_search, "compile_step", fake_compile)
    spec = plan.PlanSpec("prior", batch_per_core=16)
    edge = max(
        b for b in range(1, 600) if fake_compile(plan.PlanSpec("prior", batch_per_core=b))["fits"]
    )
    best, tried = plan_search.max_batch(spec, fake_compile(spec), 512, None, log=str)
    assert best == edge and len(tried) <= 7, [r["batch_per_core"] for r in tried]


def test_a_search_starts_from_the_compiles_already_made(monkeypatch, tmp_path):
    """A rerun (other search steps, a resumed plan) compiles nothing the memo already bounds."""
    from flax_kandinsky import tpu_plan as plan
    from flax_kandinsky import tpu_plan_search as plan_search

    calls = []

    def fake_compile(spec):
        calls.append(spec.batch_per_core)
        total = int((4 + 0.2 * spec.batch_per_core) * plan.GIB)
        return {"batch_per_core": spec.batch_per_core, "fits": total <= plan.HBM_BYTES}

    monkeypatch.setattr(plan_search, "compile_step", fake_compile)
    spec = plan.PlanSpec("prior", batch_per_core=8)
    memo = plan_search.Memo(tmp_path / "memo.jsonl")
    for b in (8, 59, 60, 61):
        memo(plan_search.compile_step, dataclasses.replace(spec, batch_per_core=b))
    other = plan_search.Memo(tmp_path / "memo.jsonl")  # the next run reads the file
    calls.clear()
    best, _ = plan_search.max_batch(spec, other(plan_search.compile_step, spec), 512, memo=other)
    assert best == 60 and calls == []
