"""Model configs of every Kandinsky 2.2 network at three sizes, as plain dicts (framework-free).

- `tiny`: the diffusers test dummies (tests/pipelines/kandinsky2_2), except that the text encoder's
  vocabulary is the real CLIP one (49,408) because our fixtures ship the real BPE tokenizer.
- `small`: a few M parameters per model, for benchmarks.
- `real`: the published kandinsky-community/kandinsky-2-2-{prior,decoder} configs.

Keys per size: text_encoder, image_encoder (transformers CLIP configs), prior, unet, movq (diffusers
model configs), prior_scheduler, decoder_scheduler, image_processor.
"""

from __future__ import annotations

import copy

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

IMAGE_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "do_rescale": True,
    "do_convert_rgb": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}

PRIOR_SCHEDULER = {
    "_class_name": "UnCLIPScheduler",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}

DECODER_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}


def _text(hidden, layers, heads, inter, proj, act="quick_gelu"):
    return {
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_size": hidden,
        "projection_dim": proj,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_act": act,
    }


def _vision(hidden, layers, heads, inter, proj, act="quick_gelu"):
    return {
        "hidden_size": hidden,
        "image_size": 224,
        "projection_dim": proj,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_channels": 3,
        "num_hidden_layers": layers,
        "patch_size": 14,
        "layer_norm_eps": 1e-05,
        "hidden_act": act,
    }


def _unet(block_out, down, up, layers, embed_dim, cross_dim, head_dim):
    return {
        "in_channels": 4,
        "out_channels": 8,
        "addition_embed_type": "image",
        "down_block_types": list(down),
        "up_block_types": list(up),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "encoder_hid_dim": embed_dim,
        "encoder_hid_dim_type": "image_proj",
        "cross_attention_dim": cross_dim,
        "attention_head_dim": head_dim,
        "resnet_time_scale_shift": "scale_shift",
        "class_embed_type": None,
    }


def _movq(block_out, down, up, layers, groups):
    return {
        "block_out_channels": list(block_out),
        "down_block_types": list(down),
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "norm_type": "spatial",
        "num_vq_embeddings": 12,
        "out_channels": 3,
        "up_block_types": list(up),
        "vq_embed_dim": 4,
    }


_SIZES = {
    "tiny": {
        "text_encoder": _text(32, 5, 4, 37, 32),
        "image_encoder": _vision(32, 5, 4, 37, 32),
        "prior": {
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "embedding_dim": 32,
            "num_layers": 1,
        },
        "unet": _unet(
            (32, 64),
            ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            1,
            32,
            32,
            4,
        ),
        "movq": _movq(
            (32, 64),
            ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            ("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
            1,
            8,
        ),
    },
    "small": {
        "text_encoder": _text(128, 4, 4, 512, 128, act="gelu"),
        "image_encoder": _vision(128, 4, 4, 512, 128, act="gelu"),
        "prior": {
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "embedding_dim": 128,
            "num_layers": 4,
        },
        "unet": _unet(
            (32, 64, 128),
            ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
            ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            2,
            128,
            128,
            32,
        ),
        "movq": _movq(
            (32, 64, 64, 128),
            (
                "DownEncoderBlock2D",
                "DownEncoderBlock2D",
                "DownEncoderBlock2D",
                "AttnDownEncoderBlock2D",
            ),
            ("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
            1,
            16,
        ),
    },
    "real": {
        "text_encoder": {
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "hidden_act": "gelu",
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
            "vocab_size": 49408,
        },
        "image_encoder": {
            "hidden_act": "gelu",
            "hidden_size": 1664,
            "image_size": 224,
            "intermediate_size": 8192,
            "layer_norm_eps": 1e-05,
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 48,
            "patch_size": 14,
            "projection_dim": 1280,
        },
        "prior": {
            "added_emb_type": "prd",
            "additional_embeddings": 4,
            "attention_head_dim": 64,
            "clip_embed_dim": None,
            "dropout": 0.0,
            "embedding_dim": 1280,
            "embedding_proj_dim": None,
            "embedding_proj_norm_type": None,
            "encoder_hid_proj_type": "linear",
            "norm_in_type": None,
            "num_attention_heads": 32,
            "num_embeddings": 77,
            "num_layers": 20,
            "time_embed_act_fn": "silu",
            "time_embed_dim": None,
        },
        "unet": {
            **_unet(
                (384, 768, 1152, 1536),
                ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                3,
                1280,
                768,
                64,
            ),
            "act_fn": "silu",
            "addition_embed_type_num_heads": 64,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "sample_size": 64,
        },
        "movq": {
            **_movq(
                (128, 256, 256, 512),
                ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
                ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
                2,
                32,
            ),
            "num_vq_embeddings": 16384,
            "act_fn": "silu",
            "sample_size": 32,
            "scaling_factor": 0.18215,
            "force_upcast": False,
            "lookup_from_codebook": False,
            "mid_block_add_attention": True,
        },
    },
}

SIZES = tuple(_SIZES)


def get_configs(size: str) -> dict:
    """Deep copy of every config of `size` ("tiny", "small", "real")."""
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; one of {SIZES}")
    out = copy.deepcopy(_SIZES[size])
    out["prior_scheduler"] = dict(PRIOR_SCHEDULER)
    out["decoder_scheduler"] = dict(DECODER_SCHEDULER)
    out["image_processor"] = copy.deepcopy(IMAGE_PROCESSOR)
    return out
