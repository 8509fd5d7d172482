"""MOVQ_TABLE: diffusers VQModel (Kandinsky 2.2 MoVQ) keys <-> the Flax port's keys.

Same leaf renames as the UNet table; the codebook `quantize.embedding.weight` is nnx.Embed's
`embedding`. Attention keys use current diffusers names (to_q/to_k/to_v/to_out.0); the deprecated
attention-block names (query/key/value/proj_attn), which diffusers still converts when loading,
are accepted on the way in and written back in the current naming.
"""

from __future__ import annotations

from flax_kandinsky.convert.engine import LINEAR, Rule, Table, conv_rules, linear_rules, norm_rules

_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _spatial_norm(p: str) -> list[Rule]:
    return [*norm_rules(f"{p}.norm_layer"), *conv_rules(f"{p}.conv_y", f"{p}.conv_b")]


def _resnet(p: str) -> list[Rule]:
    return [*norm_rules(f"{p}.norm1", f"{p}.norm2"), *_conv_block(p)]


def _cond_resnet(p: str) -> list[Rule]:
    return [*_spatial_norm(f"{p}.norm1"), *_spatial_norm(f"{p}.norm2"), *_conv_block(p)]


def _conv_block(p: str) -> list[Rule]:
    return conv_rules(f"{p}.conv1", f"{p}.conv2", f"{p}.conv_shortcut")


def _attention(p: str, norm: str) -> list[Rule]:
    norms = norm_rules(f"{p}.group_norm") if norm == "group" else _spatial_norm(f"{p}.spatial_norm")
    current = linear_rules(*(f"{p}.{n}" for n in _OLD_ATTENTION_NAMES.values()))
    old = [
        r
        for o, n in _OLD_ATTENTION_NAMES.items()
        for r in (
            Rule(f"{p}.{o}.weight", f"{p}.{n}.kernel", LINEAR),
            Rule(f"{p}.{o}.bias", f"{p}.{n}.bias"),
        )
    ]
    return [*norms, *current, *old]


MOVQ_TABLE = Table(
    "movq",
    tuple(
        [
            *conv_rules("encoder.conv_in", "encoder.conv_out", "quant_conv"),
            *norm_rules("encoder.conv_norm_out"),
            *_resnet("encoder.down_blocks.{i}.resnets.{j}"),
            *_attention("encoder.down_blocks.{i}.attentions.{j}", "group"),
            *conv_rules("encoder.down_blocks.{i}.downsamplers.{j}.conv"),
            *_resnet("encoder.mid_block.resnets.{j}"),
            *_attention("encoder.mid_block.attentions.{j}", "group"),
            Rule("quantize.embedding.weight", "quantize.embedding.embedding"),
            *conv_rules("post_quant_conv", "decoder.conv_in", "decoder.conv_out"),
            *_spatial_norm("decoder.conv_norm_out"),
            *_cond_resnet("decoder.mid_block.resnets.{j}"),
            *_attention("decoder.mid_block.attentions.{j}", "spatial"),
            *_cond_resnet("decoder.up_blocks.{i}.resnets.{j}"),
            *_attention("decoder.up_blocks.{i}.attentions.{j}", "spatial"),
            *conv_rules("decoder.up_blocks.{i}.upsamplers.{j}.conv"),
        ]
    ),
)
