"""Building a network's parameter tree as shapes and dtypes only, without tracing anything.

`nnx.eval_shape` gives such a tree too, but it traces every initializer, and each RNG draw under
that trace updates the stream's count, where flax asks the tracer for its sharding: jax answers
with an error message that scans the whole trace so far. The cost grows with the square of the
number of layers (5 s of a tiny decoder run's start-up on 2 CPU cores, minutes at real size).
Inside `shapes_only()` the layer constructors here create `jax.ShapeDtypeStruct` leaves directly.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

_SHAPES_ONLY = contextvars.ContextVar("kandinsky_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Parameters created by this package's layers inside the block hold no values."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _shape_only(key, shape, dtype=jnp.float32, out_sharding=None) -> jax.ShapeDtypeStruct:
    del key, out_sharding
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def initializers(*names: str) -> dict[str, Callable]:
    """{name: shape-only initializer} inside `shapes_only()`, else {} (the layer's defaults)."""
    return {name: _shape_only for name in names} if _SHAPES_ONLY.get() else {}


def value(init: Callable, rngs_stream: Callable, shape, dtype):
    """`init(rngs_stream(), shape, dtype)`, or its ShapeDtypeStruct inside `shapes_only()`
    (no key is drawn there)."""
    if _SHAPES_ONLY.get():
        return _shape_only(None, shape, dtype)
    return init(rngs_stream(), shape, dtype)


def zeros(shape, dtype):
    """jnp.zeros, or its ShapeDtypeStruct inside `shapes_only()`."""
    return _shape_only(None, shape, dtype) if _SHAPES_ONLY.get() else jnp.zeros(shape, dtype)
