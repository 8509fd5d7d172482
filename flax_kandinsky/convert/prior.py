"""Key table for diffusers' PriorTransformer (Kandinsky 2.2 subset: no norm_in/embedding_proj_norm).

Flax paths equal the torch keys except the leaf (Linear weight -> kernel transposed, LayerNorm
weight -> scale). `clip_mean`/`clip_std` are ClipStats variables on the Flax side, not Params, but
they convert like any other tensor so saving and loading keep them.
"""

from __future__ import annotations

from flax_kandinsky.convert.engine import Rule, Table, linear_rules, norm_rules

_BLOCK = "transformer_blocks.{i}"

PRIOR_TABLE = Table(
    "PriorTransformer",
    tuple(
        [Rule(k, k) for k in ("positional_embedding", "prd_embedding", "clip_mean", "clip_std")]
        + linear_rules("time_embedding.linear_1")
        + linear_rules("time_embedding.linear_2")
        + linear_rules("proj_in")
        + linear_rules("embedding_proj")
        + linear_rules("encoder_hidden_states_proj")
        + norm_rules(f"{_BLOCK}.norm1")
        + linear_rules(f"{_BLOCK}.attn1.to_q")
        + linear_rules(f"{_BLOCK}.attn1.to_k")
        + linear_rules(f"{_BLOCK}.attn1.to_v")
        + linear_rules(f"{_BLOCK}.attn1.to_out.0")
        + norm_rules(f"{_BLOCK}.norm3")
        + linear_rules(f"{_BLOCK}.ff.net.0.proj")
        + linear_rules(f"{_BLOCK}.ff.net.2")
        + norm_rules("norm_out")
        + linear_rules("proj_to_clip_embeddings")
    ),
)
