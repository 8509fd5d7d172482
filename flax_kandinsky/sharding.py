"""The device mesh ("data", "fsdp"), one sharding rule for every array, and global batches.

big_vision style: no per-layer annotations. A parameter (and its gradient, optimizer moments and
EMA copy, which share its shape) is split over "fsdp" along its largest dimension divisible by the
axis size; small arrays are replicated. The batch is split over both axes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kandinsky_common.errors import UserError

AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**10  # elements; smaller arrays are cheaper replicated than gathered


def parse_mesh_shape(text: str | None, num_devices: int) -> tuple[int, int]:
    """'data=4,fsdp=2', '4,2' or None (all devices on "data") -> (data, fsdp)."""
    if not text:
        return num_devices, 1
    sizes = {}
    try:
        for i, part in enumerate(text.split(",")):
            name, _, value = part.rpartition("=")
            sizes[name.strip() or AXES[i]] = int(value)
    except (ValueError, IndexError) as e:
        raise UserError(f"--mesh_shape {text!r}: write it as 'data=4,fsdp=2'") from e
    if set(sizes) - set(AXES):
        raise UserError(f"--mesh_shape {text!r}: the axes are 'data' and 'fsdp'")
    data, fsdp = sizes.get("data", -1), sizes.get("fsdp", 1)
    if data == -1:
        data = num_devices // fsdp
    if data * fsdp > num_devices or data < 1 or fsdp < 1:
        raise UserError(
            f"--mesh_shape {text!r} needs {data * fsdp} devices, but {num_devices} are visible; "
            f"make data x fsdp <= {num_devices}"
        )
    return data, fsdp


def make_mesh(mesh_shape: str | None = None, devices=None) -> Mesh:
    """A mesh over all devices, or, when --mesh_shape asks for fewer, the first data x fsdp
    (single-process runs only: every process of a multi-host run must take part)."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = parse_mesh_shape(mesh_shape, len(devices))
    if data * fsdp < len(devices):
        if jax.process_count() > 1:
            raise UserError(
                f"--mesh_shape {mesh_shape!r} uses {data * fsdp} of {len(devices)} devices; a "
                "multi-host run must use them all"
            )
        print(f"--mesh_shape {mesh_shape}: using {data * fsdp} of {len(devices)} devices")
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), AXES)


def spec_for(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def tree_shardings(mesh: Mesh, tree):
    """NamedSharding per leaf of a pytree of arrays / ShapeDtypeStructs, by the one rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(tuple(x.shape), fsdp)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """Split dim `leading` (the batch, after `leading` unsplit dims such as accumulation)."""
    return NamedSharding(mesh, P(*([None] * leading), AXES))


def global_batch(mesh: Mesh, local, leading: int = 1):
    """This process's part of the batch (a pytree of numpy arrays) -> global jax.Arrays
    (multi-host ready)."""
    sharding = batch_sharding(mesh, leading)
    local = jax.tree.map(np.asarray, local)
    if jax.process_count() == 1:
        # The local batch is the global one: one transfer for all arrays (a quarter of the host
        # time, which the prefetch thread takes from the cores running the step).
        return jax.device_put(local, sharding)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), local)


def global_replicated(mesh: Mesh, tree):
    """Host values every process holds alike (a pytree of numpy) -> replicated jax.Arrays."""
    sharding = replicated(mesh)
    tree = jax.tree.map(np.asarray, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), tree)
