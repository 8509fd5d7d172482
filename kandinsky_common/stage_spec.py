"""Framework-free facts about the two stages, shared by both backends and the cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # "prior" | "decoder"
    model_subfolder: str  # the trainable network's subfolder in the pipeline folder
    uses_captions: bool
    uses_resolution: bool
    encoded_keys: tuple[str, ...]  # what stage.encode returns (and the cache stores)


PRIOR = StageSpec(
    name="prior",
    model_subfolder="prior",
    uses_captions=True,
    uses_resolution=False,
    encoded_keys=("text_embeds", "text_hidden_states", "text_mask", "image_embeds"),
)
DECODER = StageSpec(
    name="decoder",
    model_subfolder="unet",
    uses_captions=False,
    uses_resolution=True,
    encoded_keys=("latents", "image_embeds"),
)
SPECS = {s.name: s for s in (PRIOR, DECODER)}
