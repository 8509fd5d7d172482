"""The conversion engine: rule matching, layout transforms, strict checks. Tables live beside it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from kandinsky_common.errors import UserError

IDENTITY = "identity"
LINEAR = "linear"  # torch Linear weight (out, in) <-> Flax kernel (in, out)
CONV = "conv"  # torch Conv2d weight (O, I, kh, kw) <-> Flax kernel (kh, kw, I, O)

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class ConversionError(UserError):
    """A checkpoint does not fit the model: unused, missing or misshapen keys."""


def _compile(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^.]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


def _to_flax(op: str, x: np.ndarray) -> np.ndarray:
    if op == LINEAR:
        return np.ascontiguousarray(x.T)
    if op == CONV:
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return x


def _to_torch(op: str, x: np.ndarray) -> np.ndarray:
    if op == LINEAR:
        return np.ascontiguousarray(x.T)
    if op == CONV:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


@dataclass(frozen=True)
class Rule:
    """`torch` and `flax` are dotted key templates with the same `{placeholders}`."""

    torch: str
    flax: str
    op: str = IDENTITY
    _t: re.Pattern = field(init=False, repr=False, compare=False)
    _f: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if set(_PLACEHOLDER.findall(self.torch)) != set(_PLACEHOLDER.findall(self.flax)):
            raise ValueError(f"rule {self.torch!r} -> {self.flax!r}: placeholders differ")
        object.__setattr__(self, "_t", _compile(self.torch))
        object.__setattr__(self, "_f", _compile(self.flax))


@dataclass(frozen=True)
class Table:
    """An ordered list of rules for one model; the first rule that matches a key wins."""

    name: str
    rules: tuple[Rule, ...]

    def flax_key(self, torch_key: str) -> tuple[str, str] | None:
        for r in self.rules:
            m = r._t.match(torch_key)
            if m:
                return r.flax.format(**m.groupdict()), r.op
        return None

    def torch_key(self, flax_key: str) -> tuple[str, str] | None:
        for r in self.rules:
            m = r._f.match(flax_key)
            if m:
                return r.torch.format(**m.groupdict()), r.op
        return None

    def to_flax(self, torch_sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Torch-layout state dict -> flat Flax dict (dotted keys). Raises on unmatched keys."""
        out, unused = {}, []
        for k, v in torch_sd.items():
            hit = self.flax_key(k)
            if hit is None:
                unused.append(k)
                continue
            fk, op = hit
            if fk in out:
                raise ConversionError(f"{self.name}: two source keys map to {fk!r}")
            out[fk] = _to_flax(op, np.asarray(v))
        if unused:
            raise ConversionError(
                f"{self.name}: {len(unused)} checkpoint key(s) fit no rule of the port, e.g. "
                f"{unused[:3]}; the checkpoint uses options this port does not support"
            )
        return out

    def to_torch(self, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Flat Flax dict -> torch-layout state dict. Raises on unmatched keys."""
        out, unused = {}, []
        for k, v in flat.items():
            hit = self.torch_key(k)
            if hit is None:
                unused.append(k)
                continue
            tk, op = hit
            out[tk] = _to_torch(op, np.asarray(v))
        if unused:
            raise ConversionError(f"{self.name}: Flax state keys fit no rule: {unused[:3]}")
        return out


# The rules of the common layers, shared by every table: the torch leaf `weight` becomes the Flax
# `kernel` (Linear, Conv2d: transposed), `scale` (norms) or `embedding`; biases keep their name.
def _bias(p: str) -> Rule:
    return Rule(f"{p}.bias", f"{p}.bias")


def linear_rules(*prefixes: str, bias: bool = True) -> list[Rule]:
    rules = []
    for p in prefixes:
        rules += [Rule(f"{p}.weight", f"{p}.kernel", LINEAR), *([_bias(p)] if bias else [])]
    return rules


def conv_rules(*prefixes: str) -> list[Rule]:
    return [r for p in prefixes for r in (Rule(f"{p}.weight", f"{p}.kernel", CONV), _bias(p))]


def norm_rules(*prefixes: str) -> list[Rule]:
    return [r for p in prefixes for r in (Rule(f"{p}.weight", f"{p}.scale"), _bias(p))]


def embedding_rules(*prefixes: str) -> list[Rule]:
    return [Rule(f"{p}.weight", f"{p}.embedding") for p in prefixes]


def _key(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def flatten(tree) -> dict[str, np.ndarray]:
    """Flat dotted-key dict of an nnx.State or of its pure dict (the training state's params,
    gradients), as numpy."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_key(path): np.asarray(v) for path, v in leaves}


def flat_state(model: nnx.Module, kind=nnx.Param) -> dict[str, np.ndarray]:
    """Flat dotted-key dict of a model's variables of `kind` (default: parameters), as numpy."""
    state = nnx.state(model, kind)
    return {_key(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def load_into(
    model: nnx.Module, table: Table, torch_sd: dict[str, np.ndarray], kind=nnx.Variable
) -> None:
    """Convert `torch_sd` with `table` and write it into `model` in place, strictly.

    Every variable of `kind` in the model must receive a value of its exact shape; values keep
    each variable's dtype (params stay in their param_dtype).
    """
    flat = table.to_flax(torch_sd)
    state = nnx.state(model, kind)
    targets = {_key(path): v for path, v in nnx.to_flat_state(state)}
    missing = sorted(set(targets) - set(flat))
    extra = sorted(set(flat) - set(targets))
    if missing or extra:
        raise ConversionError(
            f"{table.name}: checkpoint does not fit the model: missing {missing[:3]} "
            f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})"
        )
    for k, var in targets.items():
        value = flat[k]
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ConversionError(
                f"{table.name}: {k} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(var.get_value().shape)} in the model"
            )
        var.set_value(np.asarray(value, dtype=var.get_value().dtype))
    nnx.update(model, state)


def to_torch_layout(model: nnx.Module, table: Table, kind=nnx.Variable) -> dict[str, np.ndarray]:
    """The model's variables as a torch-layout state dict (for save_pretrained-style export)."""
    return table.to_torch(flat_state(model, kind))
