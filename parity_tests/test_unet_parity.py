"""Flax UNet2DConditionModel (K2.2 decoder) against diffusers: forward, gradients, layout, folders.

Weights go torch -> numpy -> UNET_TABLE -> Flax only; inputs are the same numpy arrays, transposed
NCHW <-> NHWC here and nowhere else.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from flax_kandinsky.convert import to_torch_layout
from flax_kandinsky.convert.engine import CONV, LINEAR
from flax_kandinsky.convert.unet import UNET_TABLE
from flax_kandinsky.models.unet import UNet2DConditionModel, load_unet, save_unet
from flax_kandinsky.pretrained import build_abstract, from_state_dict
from kandinsky_common.model_configs import get_configs
from parity_tests.conftest import max_rel, rel_l2

# A tiny variant exercising the options the K2.2 config leaves at one value: "default" time norm,
# skip_time_act, output scale factors, sinusoid layout, per-block head dims and layer counts.
VARIANT = {
    **get_configs("tiny")["unet"],
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": True,
    "resnet_out_scale_factor": 2.0,
    "mid_block_scale_factor": 1.5,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "attention_head_dim": [4, 8],
    "layers_per_block": [1, 2],
    "time_embedding_dim": 96,
    "norm_num_groups": 16,
    "norm_eps": 1e-4,
}
CONFIGS = {
    "tiny": get_configs("tiny")["unet"],
    "small": get_configs("small")["unet"],
    "variant": VARIANT,
}


def randomize(module: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Redraw every tensor (no zero or one left to hide a missing term); returns them as numpy."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, v in module.state_dict().items():
        shape = tuple(v.shape)
        if "norm" in k.split(".")[-2] and k.endswith("weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("bias"):
            a = 0.05 * rng.standard_normal(shape)
        else:  # fan-in scaling keeps activations O(1), so softmax and norms are exercised
            a = rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[1:])))
        sd[k] = a.astype(np.float32)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return sd


class Pair:
    """A randomized diffusers UNet and the Flax port loaded with its weights."""

    def __init__(self, config: dict, seed: int):
        self.config = config
        self.torch = TorchUNet(**config).eval()
        self.sd = randomize(self.torch, seed)
        self.flax = from_state_dict(
            lambda rngs: UNet2DConditionModel(config, rngs=rngs), UNET_TABLE, self.sd
        )
        self.graphdef, self.state = nnx.split(self.flax)
        self.forward = jax.jit(lambda st, x, t, e: nnx.merge(self.graphdef, st)(x, t, e))

    def inputs(self, batch: int, size: int, seed: int):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
        t = np.array([999, 0][:batch] if batch > 1 else [417], dtype=np.int64)
        e = rng.standard_normal((batch, self.config["encoder_hid_dim"])).astype(np.float32)
        return x, t, e

    def torch_out(self, x, t, e):
        kw = {"added_cond_kwargs": {"image_embeds": torch.from_numpy(e)}}
        return self.torch(torch.from_numpy(x), torch.from_numpy(t), None, **kw).sample

    def flax_out(self, x, t, e, state=None):
        out = self.forward(self.state if state is None else state, x.transpose(0, 2, 3, 1), t, e)
        return np.asarray(out).transpose(0, 3, 1, 2)


_PAIRS: dict[str, Pair] = {}


def pair(name: str) -> Pair:
    if name not in _PAIRS:
        _PAIRS[name] = Pair(CONFIGS[name], seed=len(name))
    return _PAIRS[name]


@pytest.mark.parametrize(
    "name,batch,size",
    [
        ("tiny", 1, 16),
        ("tiny", 2, 32),
        ("small", 1, 8),
        ("small", 2, 16),
        ("variant", 2, 16),
    ],
)
def test_forward_parity(name, batch, size, tol):
    p = pair(name)
    x, t, e = p.inputs(batch, size, seed=batch * 100 + size)
    with torch.no_grad():
        ref = p.torch_out(x, t, e).numpy()
    out = p.flax_out(x, t, e)
    assert out.shape == ref.shape == (batch, 8, size, size)
    err = max_rel(out, ref)
    print(f"unet {name} B={batch} {size}x{size}: max rel {err:.2e}")
    assert err <= tol["forward"]


def _flat(state) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)
    }


def test_gradient_parity(tol):
    p = pair("tiny")
    x, t, e = p.inputs(2, 16, seed=7)
    w = np.random.default_rng(8).standard_normal((2, 8, 16, 16)).astype(np.float32)

    p.torch.zero_grad()
    (p.torch_out(x, t, e) * torch.from_numpy(w)).sum().backward()
    ref = {k: v.grad.numpy() for k, v in p.torch.named_parameters()}

    def loss(state):
        out = nnx.merge(p.graphdef, state)(x.transpose(0, 2, 3, 1), t, e)
        return jnp.sum(out * w.transpose(0, 2, 3, 1))

    grads = UNET_TABLE.to_torch(_flat(jax.jit(jax.grad(loss))(p.state)))
    assert sorted(grads) == sorted(ref)
    total = rel_l2(
        np.concatenate([grads[k].ravel() for k in ref]),
        np.concatenate([ref[k].ravel() for k in ref]),
    )
    # Tensors whose gradient vanishes analytically (a conv bias right before a GroupNorm of
    # one channel per group) hold only rounding noise; judge the others one by one.
    scale = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in ref.values()))
    live = [k for k in ref if np.linalg.norm(ref[k]) > 1e-4 * scale]
    worst = max(live, key=lambda k: rel_l2(grads[k], ref[k]))
    err = rel_l2(grads[worst], ref[worst])
    print(f"unet grads: rel L2 {total:.2e}; worst of {len(live)}/{len(ref)} tensors {err:.2e}")
    assert total <= tol["gradient"]
    assert err <= tol["gradient"]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_layout_round_trip_is_bit_exact(name):
    p = pair(name)
    back = to_torch_layout(p.flax, UNET_TABLE)
    assert sorted(back) == sorted(p.sd)
    for k, v in p.sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_saved_folder_loads_in_diffusers(tmp_path):
    p = pair("tiny")
    save_unet(p.flax, p.config, tmp_path / "unet")
    reloaded = TorchUNet.from_pretrained(tmp_path / "unet").eval()
    x, t, e = p.inputs(2, 16, seed=3)
    kw = {"added_cond_kwargs": {"image_embeds": torch.from_numpy(e)}}
    with torch.no_grad():
        ref = p.torch_out(x, t, e).numpy()
        out = reloaded(torch.from_numpy(x), torch.from_numpy(t), None, **kw).sample.numpy()
    np.testing.assert_array_equal(out, ref)
    flax_model, config = load_unet(tmp_path / "unet")
    assert config["_class_name"] == "UNet2DConditionModel"
    back = to_torch_layout(flax_model, UNET_TABLE)
    assert all(np.array_equal(back[k], v) for k, v in p.sd.items())


def _torch_to_flax_shape(shape: tuple, op: str) -> tuple:
    if op == LINEAR:
        return shape[::-1]
    if op == CONV:
        return (shape[2], shape[3], shape[1], shape[0])
    return shape


def test_real_config_matches_diffusers_abstractly():
    """The published K2.2 UNet: same parameter names (through the table), shapes and count,
    with neither model allocated (Flax eval_shape, torch meta device)."""
    config = get_configs("real")["unet"]
    with torch.device("meta"):
        ref = TorchUNet(**config)
    abstract = build_abstract(lambda rngs: UNet2DConditionModel(config, rngs=rngs))
    shapes = {k: tuple(v.get_value().shape) for k, v in _flat_abstract(abstract).items()}
    expected = {}
    for k, v in ref.state_dict().items():
        fk, op = UNET_TABLE.flax_key(k)
        assert UNET_TABLE.torch_key(fk) == (k, op)
        expected[fk] = _torch_to_flax_shape(tuple(v.shape), op)
    assert shapes == expected
    n_flax = sum(math.prod(s) for s in shapes.values())
    n_torch = sum(p.numel() for p in ref.parameters())
    print(f"real UNet: {n_flax:,} parameters ({len(shapes)} tensors)")
    assert n_flax == n_torch
    assert 1.2e9 < n_flax < 1.3e9


def _flat_abstract(model) -> dict:
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model))}
