"""LoRA in Flax NNX: adapters on the attention projections of a port, their PEFT key table, and
the adapter folded into the weights.

An adapted projection is our `layers.Linear` with a `lora` module: y = W x + b + s * B(A(x)),
s = alpha / rank, the adapter computed in its own dtype (float32) on an input cast to it, then
cast to the output's dtype, as PEFT's LoRA Linear does. Its weights are `nnx.LoRAParam`, so a
split on that type separates what trains from the frozen base (whose paths are unchanged: the
base conversion tables still apply).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_kandinsky.models.layers import Linear
from kandinsky_common.lora import (
    LoraSettings,
    check_fits,
    module_keys,
    read_adapter,
    settings_of_file,
)
from kandinsky_common.stage_spec import StageSpec


class LoRA(nnx.Module):
    """The low-rank update of one Linear: x -> scale * (x @ lora_a @ lora_b).

    Parameters:
        din, dout: the adapted Linear's input and output features.
        rank: the inner dimension; scale: alpha / rank.
        rngs: draws lora_a ~ N(0, 1/rank) (PEFT's "gaussian" init); lora_b starts at zero, so
            an untrained adapter changes nothing.
    """

    def __init__(self, din: int, dout: int, rank: int, scale: float, *, rngs: nnx.Rngs):
        a = jax.random.normal(rngs.params(), (din, rank), jnp.float32) / rank
        self.lora_a = nnx.LoRAParam(a)  # (in, rank): PEFT's lora_A.weight transposed
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), jnp.float32))  # (rank, out)
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.lora_a[...], self.lora_b[...]
        return (x.astype(a.dtype) @ a @ b) * jnp.asarray(self.scale, a.dtype)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def targeted(path: str, targets) -> bool:
    """PEFT's rule for a list of target modules: the name, or a suffix after a dot."""
    return any(path == t or path.endswith("." + t) for t in targets)


def add_lora(model: nnx.Module, lora: LoraSettings, seed: int = 0) -> list[str]:
    """Give every Linear of `model` that `lora.targets` names an adapter; returns their paths
    (PEFT module names), in model order. Raises if nothing matched."""
    rngs = nnx.Rngs(params=seed)
    found = [
        (_dotted(path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Linear) and targeted(_dotted(path), lora.targets)
    ]
    if not found:
        raise ValueError(f"no Linear of {type(model).__name__} matches {lora.targets}")
    for _, module in found:
        din, dout = module.kernel.shape
        module.lora = LoRA(din, dout, lora.rank, lora.scale, rngs=rngs)
    return [name for name, _ in found]


def adapted(model: nnx.Module) -> dict[str, Linear]:
    """The adapted Linears of `model` by PEFT module name."""
    return {
        _dotted(path): m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, Linear) and m.lora is not None
    }


def peft_layout(adapter: dict, path: tuple = ()) -> dict[str, np.ndarray]:
    """A pure dict of adapter values (the LoRAParam state, or its gradient) in the file's PEFT
    layout: `<module>.lora_A.weight` (rank, in) and `<module>.lora_B.weight` (out, rank), float32
    numpy."""
    out = {}
    for key, sub in adapter.items():
        if key == "lora":
            key_a, key_b = module_keys(_dotted(path))
            out[key_a] = np.asarray(sub["lora_a"], np.float32).T
            out[key_b] = np.asarray(sub["lora_b"], np.float32).T
        else:
            out.update(peft_layout(sub, (*path, key)))
    return out


def to_peft(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapter of `model` in the file's PEFT layout."""
    return peft_layout(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def from_peft(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Set the adapter of `model` from PEFT-layout `tensors`, strictly: a key the model has no
    adapter for, an adapter the tensors miss, or a wrong shape raises UserError."""
    params = {}
    for name, m in adapted(model).items():
        key_a, key_b = module_keys(name)
        params[key_a], params[key_b] = m.lora.lora_a, m.lora.lora_b
    check_fits(tensors, {k: p.shape[::-1] for k, p in params.items()})
    for key, param in params.items():
        param[...] = jnp.asarray(np.asarray(tensors[key]).T, param.dtype)


def _merge_into(base, adapter, scale_of, path=()):
    """`base` (pure dict of params) with every adapter of `adapter` (pure dict of LoRAParams)
    folded into its kernel: kernel + scale * lora_a @ lora_b."""
    out = dict(base)
    for key, sub in adapter.items():
        if key == "lora":
            kernel = base["kernel"]
            delta = (sub["lora_a"] @ sub["lora_b"]) * scale_of(path)
            out["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        else:
            out[key] = _merge_into(base[key], sub, scale_of, (*path, key))
    return out


def merged_params(model: nnx.Module, adapter: dict | None = None) -> dict:
    """The base params of `model` (a pure dict, the shape of an un-adapted port's nnx.Param
    state) with its adapters folded in; `adapter` (a pure dict of the LoRAParams) replaces the
    model's own adapter values. What a sampler or an export of the merged network takes."""
    _, lora_state, base_state, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    if adapter is None:
        adapter = nnx.to_pure_dict(lora_state)
    scales = {name: m.lora.scale for name, m in adapted(model).items()}
    return _merge_into(nnx.to_pure_dict(base_state), adapter, lambda path: scales[_dotted(path)])


def merged_from_file(model: nnx.Module, folder, spec: StageSpec) -> dict:
    """The params of `model` (a stage's pretrained network) with the adapter file in `folder`
    (a LoRA run's output_dir) folded in: what a sampler takes to draw with the adapter."""
    tensors, config = read_adapter(folder, spec.model_subfolder)
    add_lora(model, settings_of_file(config, spec.model_subfolder, spec))
    from_peft(model, tensors)
    return merged_params(model)


def fold(model: nnx.Module) -> nnx.Module:
    """Fold every adapter of `model` into its Linear's kernel and remove it (in place): the
    network an un-adapted port loads, for a merged export."""
    nnx.update(model, merged_params(model))
    for m in adapted(model).values():
        m.lora = None
    return model


def trainable_count(model: nnx.Module) -> int:
    """Number of adapter parameters of `model`."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
