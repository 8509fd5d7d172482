"""Framework-free facts about the two stages, shared by both backends and the cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # "prior" | "decoder"
    model_subfolder: str  # the trainable network's subfolder in the pipeline folder
    uses_captions: bool
    uses_resolution: bool
    takes_prediction_type: bool  # --prediction_type applies (the prior always predicts x0)
    encoded_keys: tuple[str, ...]  # what stage.encode returns (and the cache stores)
    caption_keys: tuple[str, ...]  # the encoded keys of the caption (a text-only batch's)
    # (pipeline folder, subfolder) of everything that shapes the encoder outputs
    encoder_folders: tuple[tuple[str, str], ...]
    # LoRA targets: the attention projections of the trainable network (PEFT module suffixes)
    lora_targets: tuple[str, ...]


PRIOR = StageSpec(
    name="prior",
    model_subfolder="prior",
    uses_captions=True,
    uses_resolution=False,
    takes_prediction_type=False,
    encoded_keys=("text_embeds", "text_hidden_states", "text_mask", "image_embeds"),
    caption_keys=("text_embeds", "text_hidden_states", "text_mask"),
    encoder_folders=(("prior", "text_encoder"), ("prior", "image_encoder"), ("prior", "tokenizer")),
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
DECODER = StageSpec(
    name="decoder",
    model_subfolder="unet",
    uses_captions=False,
    uses_resolution=True,
    takes_prediction_type=True,
    encoded_keys=("latents", "image_embeds"),
    caption_keys=(),
    encoder_folders=(("decoder", "movq"), ("prior", "image_encoder")),
    # the image-embedding attention's own key/value projections too
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),
)
SPECS = {s.name: s for s in (PRIOR, DECODER)}
