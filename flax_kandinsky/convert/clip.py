"""Key tables for transformers' CLIPTextModelWithProjection and CLIPVisionModelWithProjection.

The Flax paths equal the torch keys except the leaf: Linear weight -> kernel (transposed),
LayerNorm weight -> scale, Embedding weight -> embedding, Conv2d weight -> kernel (OIHW -> HWIO).
"""

from __future__ import annotations

import numpy as np

from flax_kandinsky.convert.engine import (
    CONV,
    ConversionError,
    Rule,
    Table,
    embedding_rules,
    linear_rules,
    norm_rules,
)


def _encoder(prefix: str) -> list[Rule]:
    layer = f"{prefix}.encoder.layers.{{i}}"
    rules = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear_rules(f"{layer}.self_attn.{proj}")
    for fc in ("fc1", "fc2"):
        rules += linear_rules(f"{layer}.mlp.{fc}")
    return rules + norm_rules(f"{layer}.layer_norm1") + norm_rules(f"{layer}.layer_norm2")


TEXT_TABLE = Table(
    "CLIPTextModelWithProjection",
    tuple(
        embedding_rules("text_model.embeddings.token_embedding")
        + embedding_rules("text_model.embeddings.position_embedding")
        + _encoder("text_model")
        + norm_rules("text_model.final_layer_norm")
        + linear_rules("text_projection", bias=False)
    ),
)

VISION_TABLE = Table(
    "CLIPVisionModelWithProjection",
    tuple(
        [
            Rule(
                "vision_model.embeddings.class_embedding", "vision_model.embeddings.class_embedding"
            ),
            Rule(
                "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.patch_embedding.kernel",
                CONV,
            ),
        ]
        + embedding_rules("vision_model.embeddings.position_embedding")
        + norm_rules("vision_model.pre_layrnorm")
        + _encoder("vision_model")
        + norm_rules("vision_model.post_layernorm")
        + linear_rules("visual_projection", bias=False)
    ),
)

# transformers < 4.31 saved these arange buffers; they are recomputed, never learned.
_LEGACY_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def clean_state_dict(torch_sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the legacy `embeddings.position_ids` buffers after checking they hold 0..N-1.

    Every other key goes to the table, which rejects anything it does not know.
    """
    out = dict(torch_sd)
    for key in _LEGACY_BUFFERS:
        if key in out:
            ids = np.asarray(out.pop(key))
            if not np.array_equal(ids.reshape(-1), np.arange(ids.size)):
                raise ConversionError(f"{key} is not 0..{ids.size - 1}; custom position ids")
    return out
