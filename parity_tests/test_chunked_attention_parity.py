"""The sampler's default attention ("chunked") against diffusers, where it really splits the work.

The decoder pipeline runs the UNet and MoVQ with `set_attention("chunked")`; below
`layers.QUERY_CHUNK` tokens that is the dot kernel itself (the other parity tests), so these
inputs are long enough for several query blocks.
"""

import copy

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from flax_kandinsky.models.layers import QUERY_CHUNK, set_attention
from parity_tests import test_movq_parity as movq
from parity_tests import test_unet_parity as unet
from parity_tests.conftest import max_rel


def chunked(model: nnx.Module):
    """(graphdef, state) of a copy of `model` with chunked attention."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    set_attention("chunked", copy)
    return nnx.split(copy)


def test_movq_decode_with_chunked_attention(tol):
    p = movq.pair("tiny")
    side = 40  # 1600 tokens in the mid block's and the first up block's attention
    assert side * side > QUERY_CHUNK
    h = np.random.default_rng(7).standard_normal((1, 4, side, side)).astype(np.float32)
    # diffusers' MoVQ in float64, the exact answer: its own float32 run is off it by 1.8e-5 on
    # an AVX2 CPU (ours by 7.8e-6), so a float32 comparison would measure torch's rounding.
    with torch.no_grad():
        exact = copy.deepcopy(p.torch).double()
        h64 = torch.from_numpy(h).double()
        ref = exact.decode(h64, force_not_quantize=True).sample.numpy()
    graphdef, state = chunked(p.flax)
    decode = jax.jit(lambda st, x: nnx.merge(graphdef, st).decode(x, force_not_quantize=True))
    out = movq.nchw(decode(state, movq.nhwc(h)))
    err = max_rel(out, ref)
    print(f"movq decode tiny chunked {side}x{side}: max rel {err:.2e}")
    assert err <= tol["forward"]


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_forward_with_chunked_attention(batch, tol):
    p = unet.pair("tiny")
    size = 80  # attention at 40x40 = 1600 tokens (+ the image-embedding tokens as keys)
    x, t, e = p.inputs(batch, size, seed=batch)
    with torch.no_grad():
        ref = p.torch_out(x, t, e).numpy()
    graphdef, state = chunked(p.flax)
    forward = jax.jit(lambda st, x, t, e: nnx.merge(graphdef, st)(x, t, e))
    out = np.asarray(forward(state, x.transpose(0, 2, 3, 1), t, e)).transpose(0, 3, 1, 2)
    err = max_rel(out, ref)
    print(f"unet tiny chunked B={batch} {size}x{size}: max rel {err:.2e}")
    assert err <= tol["forward"]
