"""LoRA on the torch backend: PEFT adapters on the attention projections of a diffusers network,
read and written in the adapter file's layout, and folded into the weights.

As diffusers' current LoRA scripts: `model.add_adapter(peft.LoraConfig(...))` with A ~ N(0, 1/r),
B = 0; the base frozen (and in the --mixed_precision dtype), the adapter in float32.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from kandinsky_common.errors import UserError
from kandinsky_common.lora import LoraSettings, check_fits, initial_adapter


def add_lora(model: torch.nn.Module, lora: LoraSettings, seed: int = 0, base_dtype=None):
    """Freeze `model` (cast to `base_dtype` when given) and add the adapter in float32, drawn by
    `initial_adapter` from `seed` (as the flax backend draws it); only the adapter requires grad
    afterwards."""
    model.requires_grad_(False)
    for p in model.parameters():
        if base_dtype is not None and p.dtype != base_dtype:
            # per tensor: ModelMixin.to() warns about float32 modules the K2.2 networks lack
            p.data = p.data.to(base_dtype)
    model.add_adapter(LoraConfig(**lora.peft_config()))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    from_peft(model, initial_adapter(shapes, seed))
    return model


def to_peft(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter of `model` in the file's layout (unprefixed PEFT keys), float32 numpy."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().float().cpu().numpy() for k, v in state.items()}


def from_peft(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Set the adapter of `model` from file-layout `tensors`, strictly (unknown, missing or
    misshapen keys raise UserError)."""
    check_fits(tensors, {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()})
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"the adapter keys {unexpected[:3]} were not taken by the network")


def fold(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the weights and remove it (in place): a plain diffusers network."""
    model.fuse_lora()
    model.unload_lora()
    return model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
