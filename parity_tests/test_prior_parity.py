"""PriorTransformer: Flax port against diffusers (forward, gradients, round trip, real config)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PriorTransformer as TorchPrior
from flax import nnx

from flax_kandinsky import pretrained
from flax_kandinsky.convert import to_torch_layout
from flax_kandinsky.convert.prior import PRIOR_TABLE
from flax_kandinsky.models import prior
from kandinsky_common.model_configs import get_configs
from parity_tests.conftest import max_rel, rel_l2
from parity_tests.test_clip_parity import abstract_torch_shapes, torch_sd


def make_pair(config: dict, seed: int):
    """A diffusers prior with every tensor random (its zero-initialised ones too) and its port."""
    torch.manual_seed(seed)
    ref = TorchPrior(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "clip_std":
                p.copy_(0.5 + noise.abs())
            elif name in ("clip_mean", "positional_embedding", "prd_embedding"):
                p.copy_(noise)
            elif p.ndim == 1:  # LayerNorm scales/biases and Linear biases
                p.add_(0.1 * noise)
    factory = lambda rngs: prior.PriorTransformer(config, rngs=rngs)  # noqa: E731
    return ref, pretrained.from_state_dict(factory, PRIOR_TABLE, torch_sd(ref))


def make_inputs(config: dict, batch: int, seed: int, masked: bool):
    rng = np.random.default_rng(seed)
    dim, n = config["embedding_dim"], config.get("num_embeddings", 77)
    x = rng.standard_normal((batch, dim), np.float32)
    t = rng.integers(0, 1000, batch)
    proj = rng.standard_normal((batch, dim), np.float32)
    enc = rng.standard_normal((batch, n, dim), np.float32)
    mask = None
    if masked:  # trailing zeros of different lengths; with B > 1, row 0 keeps all its tokens
        lengths = rng.integers(2, n, batch)
        lengths[0] = n if batch > 1 else lengths[0]
        mask = np.arange(n)[None] < lengths[:, None]
    return x, t, proj, enc, mask


def torch_forward(ref, x, t, proj, enc, mask):
    tensors = [torch.from_numpy(v) for v in (x, t, proj, enc)]
    am = None if mask is None else torch.from_numpy(mask)
    return ref(*tensors, attention_mask=am).predicted_image_embedding


@nnx.jit
def flax_forward(model, x, t, proj, enc, mask):
    return model(x, t, proj, enc, mask)


@pytest.fixture(scope="module", params=["tiny", "small"])
def pair(request):
    config = get_configs(request.param)["prior"]
    return request.param, config, *make_pair(config, seed=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward(pair, batch, masked, tol):
    size, config, ref, model = pair
    inputs = make_inputs(config, batch, seed=batch, masked=masked)
    with torch.no_grad():
        want = torch_forward(ref, *inputs).numpy()
    got = flax_forward(model, *(None if v is None else jnp.asarray(v) for v in inputs))
    err = max_rel(got, want)
    print(f"prior {size} B={batch} mask={masked}: max rel {err:.2e}")
    assert err <= tol["forward"]
    latents = np.asarray(model.post_process_latents(got))
    with torch.no_grad():
        want_latents = ref.post_process_latents(torch.from_numpy(np.array(got))).numpy()
    assert max_rel(latents, want_latents) <= tol["forward"]


def test_gradients(pair, tol):
    """d/dparams of sum(output * w) for every trainable tensor; clip stats get none (both sides)."""
    size, config, ref, model = pair
    x, t, proj, enc, mask = make_inputs(config, 3, seed=11, masked=True)
    weight = np.random.default_rng(12).standard_normal((3, config["embedding_dim"]), np.float32)

    ref.zero_grad()
    (torch_forward(ref, x, t, proj, enc, mask) * torch.from_numpy(weight)).sum().backward()
    named = dict(ref.named_parameters())
    assert named["clip_mean"].grad is None and named["clip_std"].grad is None
    torch_grads = {k: p.grad.numpy() for k, p in named.items() if p.grad is not None}
    want = PRIOR_TABLE.to_flax(torch_grads)

    def loss(m):
        return jnp.sum(m(x, t, proj, enc, jnp.asarray(mask)) * weight)

    grads = nnx.jit(nnx.grad(loss))(model)  # w.r.t. nnx.Param only: ClipStats are left out
    got = {
        ".".join(str(getattr(p, "key", p)) for p in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(grads)
    }
    assert sorted(got) == sorted(want)
    keys = sorted(want)
    err = rel_l2(
        np.concatenate([got[k].ravel() for k in keys]),
        np.concatenate([want[k].ravel() for k in keys]),
    )
    # A key bias shifts every logit of a softmax row equally: its gradient is zero up to rounding
    # on both sides, so only its size is checked; every other tensor is compared on its own too.
    total = np.sqrt(sum(np.sum(want[k].astype(np.float64) ** 2) for k in keys))
    zero = [k for k in keys if k.endswith("attn1.to_k.bias")]
    for k in zero:
        assert max(np.linalg.norm(got[k]), np.linalg.norm(want[k])) <= 1e-6 * total, k
    per_tensor = {k: rel_l2(got[k], want[k]) for k in keys if k not in zero}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"prior {size} grads: rel L2 {err:.2e}; worst tensor {worst} {per_tensor[worst]:.2e}")
    assert err <= tol["gradient"]
    assert per_tensor[worst] <= tol["gradient"], worst


def test_round_trip_bit_exact():
    ref, model = make_pair(get_configs("tiny")["prior"], seed=3)
    sd, back = torch_sd(ref), to_torch_layout(model, PRIOR_TABLE)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_save_loads_in_diffusers(tmp_path, tol):
    config = get_configs("tiny")["prior"]
    ref, model = make_pair(config, seed=4)
    prior.save_prior(model, config, tmp_path)
    loaded = TorchPrior.from_pretrained(tmp_path).eval()
    sd = torch_sd(ref)
    assert sorted(torch_sd(loaded)) == sorted(sd)
    assert all(np.array_equal(v, sd[k]) for k, v in torch_sd(loaded).items())
    inputs = make_inputs(config, 2, seed=4, masked=True)
    with torch.no_grad():
        a, b = torch_forward(ref, *inputs), torch_forward(loaded, *inputs)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    again, cfg = prior.load_prior(tmp_path)
    assert cfg["_class_name"] == "PriorTransformer"
    back = to_torch_layout(again, PRIOR_TABLE)
    assert all(np.array_equal(back[k], v) for k, v in sd.items())


def test_loads_folder_saved_by_diffusers(tmp_path):
    ref, _ = make_pair(get_configs("tiny")["prior"], seed=5)
    ref.save_pretrained(tmp_path)
    model, config = prior.load_prior(tmp_path)
    assert config["_class_name"] == "PriorTransformer"
    back = to_torch_layout(model, PRIOR_TABLE)
    assert sorted(back) == sorted(torch_sd(ref))
    assert all(np.array_equal(back[k], v) for k, v in torch_sd(ref).items())


def test_real_config_names_shapes_counts():
    """Published K2.2 prior config, no weights: abstract Flax model vs torch on the meta device."""
    config = get_configs("real")["prior"]
    model = pretrained.build_abstract(lambda rngs: prior.PriorTransformer(config, rngs=rngs))
    flax_shapes = abstract_torch_shapes(model, PRIOR_TABLE)
    with torch.device("meta"):
        ref = TorchPrior(**config)
    torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert flax_shapes == torch_shapes
    count = sum(math.prod(s) for s in flax_shapes.values())
    assert count == sum(p.numel() for p in ref.parameters())
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count - trainable == 2 * 1280  # clip_mean + clip_std
    print(f"real prior: {count:,} parameters ({trainable:,} trainable)")
    assert abs(count / 1e6 - 1026.2) < 0.1, count
