"""The checks on parsed flags that need no files or models: every one raises UserError with
the fix. `flags.parse_config` runs them on its TrainConfig (`cfg` below; this module does not
import flags, which imports it)."""

from __future__ import annotations

import os
from pathlib import Path

from kandinsky_common.errors import UserError
from kandinsky_common.stage_spec import SPECS
from kandinsky_common.storage import bucket_reachable, check_url, is_url


def validate_lora(cfg) -> None:
    """The LoRA scripts' own checks; `--validation_prompt` becomes the validation prompts."""
    _positive(cfg, "rank", "num_validation_images", "lora_alpha")
    if cfg.use_ema:
        raise UserError(
            "--use_ema is not a flag of the LoRA scripts (as in diffusers): the adapter is "
            "small, train it without; or fine-tune fully with train_text_to_image_<stage>.py"
        )
    if cfg.validation_prompt is not None:
        if cfg.validation_prompts:
            raise UserError("pass --validation_prompt or --validation_prompts, not both")
        cfg.validation_prompts = [cfg.validation_prompt] * cfg.num_validation_images


def _positive(cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v <= 0:
            raise UserError(f"--{n} must be positive, got {v}")


def validate(cfg, stage: str) -> None:
    """Cross-flag checks that need no files or models; raises UserError with the fix."""
    if stage not in SPECS:
        raise ValueError(stage)
    sources = [f"--{n}" for n in ("dataset_name", "train_data_dir", "instance_data_dir")]
    given = [f for f in sources if getattr(cfg, f[2:]) is not None]
    if not given:
        raise UserError(
            "no training data: pass --dataset_name DIR, --train_data_dir DIR, or (DreamBooth) "
            "--instance_data_dir DIR with --instance_prompt"
        )
    if len(given) > 1:
        raise UserError(f"pass one source of training data, not {' and '.join(given)}")
    _validate_dreambooth(cfg)
    _positive(
        cfg,
        "train_batch_size",
        "num_train_epochs",
        "max_train_steps",
        "gradient_accumulation_steps",
        "learning_rate",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_epochs",
        "max_train_samples",
        "resolution",
        "snr_gamma",
        "validation_steps",
        "max_grad_norm",
    )
    if cfg.lr_warmup_steps < 0 or cfg.dataloader_num_workers < 0 or cfg.adam_weight_decay < 0:
        raise UserError("--lr_warmup_steps, --dataloader_num_workers, --adam_weight_decay are >= 0")
    if cfg.image_memory_mb < 0:
        raise UserError(
            f"--image_memory_mb {cfg.image_memory_mb} is negative; pass 0 to decode every image in "
            "every epoch, or the MB of host memory to keep decoded images in"
        )
    if cfg.encoder_memory_mb < 0:
        raise UserError(
            f"--encoder_memory_mb {cfg.encoder_memory_mb} is negative; pass 0 to run the frozen "
            "encoders on every batch, or the MB of host memory to keep their outputs in"
        )
    spec = SPECS[stage]
    if spec.uses_resolution and cfg.resolution % 64:
        raise UserError(
            f"--resolution {cfg.resolution} is not a multiple of 64 (MoVQ /8 x UNet /8); "
            f"use e.g. {max(64, round(cfg.resolution / 64) * 64)}"
        )
    if not spec.takes_prediction_type and cfg.prediction_type is not None:
        raise UserError("--prediction_type is a decoder flag; the prior always predicts the sample")
    if cfg.lr_scheduler == "piecewise_constant" and not cfg.lr_step_rules:
        raise UserError("--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. '1:100,0.1'")
    if cfg.report_to == "wandb" and cfg.hub_token is not None:
        raise UserError(
            "--hub_token with --report_to wandb would expose the token; use `hf auth login` instead"
        )
    if cfg.backend == "flax":
        _validate_flax(cfg)
    elif cfg.attention != "dot":
        raise UserError(
            "--attention is a flax flag; the torch backend uses SDPA (or "
            "--enable_xformers_memory_efficient_attention on CUDA)"
        )
    elif cfg.mesh_shape or cfg.coordinator_address or cfg.num_processes or cfg.process_id:
        raise UserError(
            "--mesh_shape/--coordinator_address/--num_processes/--process_id are flax flags; "
            "the torch backend is launched with torchrun"
        )
    _check_storage(cfg)


def _validate_dreambooth(cfg) -> None:
    if cfg.instance_data_dir is None:
        if cfg.instance_prompt is not None or cfg.with_prior_preservation:
            raise UserError(
                "--instance_prompt and --with_prior_preservation are DreamBooth flags: pass the "
                "subject's images with --instance_data_dir DIR"
            )
        return
    if not cfg.instance_prompt:
        raise UserError('--instance_data_dir needs --instance_prompt, e.g. "a photo of sks dog"')
    _positive(cfg, "num_class_images", "sample_batch_size", "class_image_steps")
    if cfg.prior_loss_weight < 0:
        raise UserError(f"--prior_loss_weight must be >= 0, got {cfg.prior_loss_weight}")
    if cfg.with_prior_preservation:
        if not cfg.class_data_dir or not cfg.class_prompt:
            raise UserError(
                "--with_prior_preservation needs --class_data_dir DIR (missing class images are "
                'generated there) and --class_prompt, e.g. "a photo of a dog"'
            )
        if cfg.embeddings_cache:
            raise UserError(
                "--embeddings_cache does not take DreamBooth's paired instance and class batches; "
                "drop it (a DreamBooth data set is small: the encoders cost little)"
            )


def _check_storage(cfg) -> None:
    """gs:// URLs: a supported scheme, the flax backend (orbax writes to buckets; accelerate's
    checkpoints are local files), a bucket that answers. Local output_dir: writable."""
    urls = [
        (flag, getattr(cfg, name))
        for flag, name in (
            ("--output_dir", "output_dir"),
            ("--logging_dir", "logging_dir"),
            ("--embeddings_cache", "embeddings_cache"),
        )
        if is_url(getattr(cfg, name))
    ]
    for flag, url in urls:
        check_url(url, flag)
        if cfg.backend != "flax":
            raise UserError(
                f"{flag} {url}: the torch backend writes to local folders; pass a local folder "
                "(or a mounted bucket), or use --backend flax"
            )
    reached = set()
    for flag, url in urls:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if bucket not in reached:
            bucket_reachable(url, flag)
            reached.add(bucket)
    if not is_url(cfg.output_dir):
        _check_output_dir(Path(cfg.output_dir))


def _check_output_dir(out: Path) -> None:
    """output_dir (or the folder it would be created in) must be a writable folder: found now,
    not after minutes of model loading and compiling, and before anything is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a folder path")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"--output_dir {out} cannot be created: {existing} is a file; pass a folder path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"--output_dir {out} is not writable ({existing} is read-only or not yours); pass a "
            "folder you can write to"
        )


def _validate_flax(cfg) -> None:
    """Flags the flax backend cannot honour exit 2 with the reason, before any work."""
    if cfg.mixed_precision == "fp16":
        raise UserError(
            "--mixed_precision fp16 is not available on the flax backend (TPUs have no fp16); "
            "use bf16: bf16 compute with fp32 master weights"
        )
    if cfg.use_8bit_adam:
        raise UserError("--use_8bit_adam is a bitsandbytes (CUDA) optimizer; drop it for flax")
    if cfg.enable_xformers_memory_efficient_attention:
        raise UserError(
            "--enable_xformers_memory_efficient_attention is CUDA/PyTorch only; the flax "
            "backend's attention is compiled by XLA"
        )
    if (cfg.num_processes is None) != (cfg.process_id is None):
        raise UserError("--num_processes and --process_id go together (with --coordinator_address)")
