"""Flax MoVQ (VQModel) against diffusers: encode, decode, layout, folders, the real config.

Weights go torch -> numpy -> MOVQ_TABLE -> Flax only; inputs are the same numpy arrays, transposed
NCHW <-> NHWC here and nowhere else.
"""

import math

import jax
import numpy as np
import pytest
import torch
from diffusers import VQModel as TorchVQModel
from flax import nnx

from flax_kandinsky.convert import to_torch_layout
from flax_kandinsky.convert.engine import CONV, LINEAR
from flax_kandinsky.convert.movq import MOVQ_TABLE
from flax_kandinsky.models.movq import VQModel, load_movq, save_movq
from flax_kandinsky.pretrained import build_abstract, from_state_dict
from kandinsky_common.model_configs import get_configs
from parity_tests.conftest import max_rel


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


def nhwc(x):
    return x.transpose(0, 2, 3, 1)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


class Pair:
    """A randomized diffusers VQModel and the Flax port loaded with its weights."""

    def __init__(self, config: dict, seed: int):
        self.config = config
        self.factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.torch = TorchVQModel(**config).eval()
        self.sd = randomize(self.torch, seed)
        self.flax = from_state_dict(lambda rngs: VQModel(config, rngs=rngs), MOVQ_TABLE, self.sd)
        gd, self.state = nnx.split(self.flax)
        self.encode = jax.jit(lambda st, x: nnx.merge(gd, st).encode(x))
        self.decode = jax.jit(
            lambda st, h, fnq: nnx.merge(gd, st).decode(h, force_not_quantize=fnq),
            static_argnums=2,
        )


_PAIRS: dict[str, Pair] = {}


def pair(size: str) -> Pair:
    if size not in _PAIRS:
        _PAIRS[size] = Pair(get_configs(size)["movq"], seed=len(size))
    return _PAIRS[size]


CASES = [("tiny", 1, 32), ("tiny", 2, 48), ("small", 1, 32), ("small", 2, 64)]


@pytest.mark.parametrize("size,batch,pixels", CASES)
def test_encode_parity(size, batch, pixels, tol):
    p = pair(size)
    x = np.random.default_rng(batch + pixels).uniform(-1, 1, (batch, 3, pixels, pixels))
    x = x.astype(np.float32)
    with torch.no_grad():
        ref = p.torch.encode(torch.from_numpy(x)).latents.numpy()
    out = nchw(p.encode(p.state, nhwc(x)))
    side = pixels // p.factor
    assert out.shape == ref.shape == (batch, 4, side, side)
    err = max_rel(out, ref)
    print(f"movq encode {size} B={batch} {pixels}px: max rel {err:.2e}")
    assert err <= tol["forward"]


@pytest.mark.parametrize("size,batch,pixels", CASES)
def test_decode_parity(size, batch, pixels, tol):
    p = pair(size)
    side = pixels // p.factor
    h = np.random.default_rng(batch * pixels).standard_normal((batch, 4, side, side))
    h = h.astype(np.float32)
    with torch.no_grad():
        ref = p.torch.decode(torch.from_numpy(h), force_not_quantize=True).sample.numpy()
    out = nchw(p.decode(p.state, nhwc(h), True))
    assert out.shape == ref.shape == (batch, 3, pixels, pixels)
    err = max_rel(out, ref)
    print(f"movq decode {size} B={batch} {pixels}px: max rel {err:.2e}")
    assert err <= tol["forward"]


def test_quantized_decode_parity(tol):
    """diffusers' default decode snaps latents to the codebook first; so does the port."""
    p = pair("tiny")
    h = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32) * 0.1
    with torch.no_grad():
        ref = p.torch.decode(torch.from_numpy(h)).sample.numpy()
        codes = p.torch.quantize(torch.from_numpy(h))[2][2].numpy().reshape(2, 8, 8)
    assert len(np.unique(codes)) > 1  # the test must exercise the lookup
    out = nchw(p.decode(p.state, nhwc(h), False))
    _, idx = p.flax.quantize(nhwc(h))
    np.testing.assert_array_equal(np.asarray(idx), codes)
    err = max_rel(out, ref)
    print(f"movq quantized decode tiny: max rel {err:.2e}")
    assert err <= tol["forward"]


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_layout_round_trip_is_bit_exact(size):
    p = pair(size)
    back = to_torch_layout(p.flax, MOVQ_TABLE)
    assert sorted(back) == sorted(p.sd)
    for k, v in p.sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_saved_folder_loads_in_diffusers(tmp_path):
    p = pair("tiny")
    save_movq(p.flax, p.config, tmp_path / "movq")
    reloaded = TorchVQModel.from_pretrained(tmp_path / "movq").eval()
    x = np.random.default_rng(9).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref, out = (
            m.decode(m.encode(torch.from_numpy(x)).latents, force_not_quantize=True).sample
            for m in (p.torch, reloaded)
        )
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    flax_model, config = load_movq(tmp_path / "movq")
    assert config["_class_name"] == "VQModel"
    back = to_torch_layout(flax_model, MOVQ_TABLE)
    assert all(np.array_equal(back[k], v) for k, v in p.sd.items())


def _torch_to_flax_shape(shape: tuple, op: str) -> tuple:
    if op == LINEAR:
        return shape[::-1]
    if op == CONV:
        return (shape[2], shape[3], shape[1], shape[0])
    return shape


def test_real_config_matches_diffusers_abstractly():
    """The published K2.2 MoVQ: same parameter names (through the table), shapes and count,
    with neither model allocated (Flax eval_shape, torch meta device)."""
    config = get_configs("real")["movq"]
    with torch.device("meta"):
        ref = TorchVQModel(**config)
    abstract = build_abstract(lambda rngs: VQModel(config, rngs=rngs))
    shapes = {
        ".".join(map(str, path)): tuple(v.get_value().shape)
        for path, v in nnx.to_flat_state(nnx.state(abstract))
    }
    expected = {}
    for k, v in ref.state_dict().items():
        fk, op = MOVQ_TABLE.flax_key(k)
        assert MOVQ_TABLE.torch_key(fk) == (k, op)
        expected[fk] = _torch_to_flax_shape(tuple(v.shape), op)
    assert shapes == expected
    n_flax = sum(math.prod(s) for s in shapes.values())
    n_torch = sum(p.numel() for p in ref.parameters())
    print(f"real MoVQ: {n_flax:,} parameters ({len(shapes)} tensors)")
    assert n_flax == n_torch
    assert 6.0e7 < n_flax < 7.5e7
