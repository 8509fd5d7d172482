"""UNET_TABLE: diffusers UNet2DConditionModel (K2.2 decoder) keys <-> the Flax port's keys.

Flax keys are the torch keys with the leaf renamed: Linear/Conv `weight` -> `kernel` (transposed
to (in, out) / (kh, kw, in, out)), norm `weight` -> `scale`; biases keep their name.
"""

from __future__ import annotations

from flax_kandinsky.convert.engine import (
    Rule,
    Table,
    conv_rules,
    linear_rules,
    norm_rules,
)


def _resnet(p: str) -> list[Rule]:
    return [
        *norm_rules(f"{p}.norm1", f"{p}.norm2"),
        *conv_rules(f"{p}.conv1", f"{p}.conv2", f"{p}.conv_shortcut"),
        *linear_rules(f"{p}.time_emb_proj"),
    ]


def _attention(p: str) -> list[Rule]:
    names = ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "to_out.0")
    return [*norm_rules(f"{p}.group_norm"), *linear_rules(*(f"{p}.{n}" for n in names))]


_RESNETS = (
    "down_blocks.{i}.resnets.{j}",
    "down_blocks.{i}.downsamplers.{j}",
    "mid_block.resnets.{j}",
    "up_blocks.{i}.resnets.{j}",
    "up_blocks.{i}.upsamplers.{j}",
)
_ATTENTIONS = (
    "down_blocks.{i}.attentions.{j}",
    "mid_block.attentions.{j}",
    "up_blocks.{i}.attentions.{j}",
)

UNET_TABLE = Table(
    "unet",
    tuple(
        [
            *conv_rules("conv_in", "conv_out"),
            *norm_rules("conv_norm_out"),
            *linear_rules("time_embedding.linear_1", "time_embedding.linear_2"),
            *linear_rules("encoder_hid_proj.image_embeds", "add_embedding.image_proj"),
            *norm_rules("encoder_hid_proj.norm", "add_embedding.image_norm"),
            *(r for p in _RESNETS for r in _resnet(p)),
            *(r for p in _ATTENTIONS for r in _attention(p)),
        ]
    ),
)
