"""TrainConfig: every flag of the diffusers Kandinsky 2.2 training scripts, plus ours, in one class.

Field names, types and defaults are those of `train_text_to_image_prior.py` and
`train_text_to_image_decoder.py` (44 flags, the union of the two), so their command lines paste
unchanged. Flags we add are listed in OUR_FLAGS and documented in docs/flags.md. Parsing is
transformers.HfArgumentParser: command-line flags, or a single .json / .yaml file.

The parser's module is loaded without the transformers package around it (`_hf_argument_parser`):
importing transformers costs a second of every start (its version checks of ~40 packages), and a
flax decoder run needs nothing else from it, so its flags, and with them the early load of its
step, come that much sooner.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kandinsky_common.config_files import CONFIG_SUFFIXES, file_to_argv, load_config_file
from kandinsky_common.errors import UserError
from kandinsky_common.flag_checks import validate, validate_lora
from kandinsky_common.folders import user_path
from kandinsky_common.lr_schedules import LR_SCHEDULER_NAMES
from kandinsky_common.stage_spec import SPECS
from kandinsky_common.storage import is_url

LR_SCHEDULERS = LR_SCHEDULER_NAMES
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")
BACKENDS = ("flax", "torch")
STAGES = tuple(SPECS)  # the stage names, in SPECS order


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- models -------------------------------------------------------------------------------
    pretrained_decoder_model_name_or_path: str = _f(
        "kandinsky-community/kandinsky-2-2-decoder",
        "Decoder pipeline folder (unet/, movq/, scheduler/). Prior stage: used for validation.",
    )
    pretrained_prior_model_name_or_path: str = _f(
        "kandinsky-community/kandinsky-2-2-prior",
        "Prior pipeline folder (prior/, text_encoder/, image_encoder/, tokenizer/, ...).",
    )
    # --- data ---------------------------------------------------------------------------------
    dataset_name: str | None = _f(None, "Dataset: a local dataset folder or save_to_disk folder.")
    dataset_config_name: str | None = _f(None, "The config of the dataset, if it has several.")
    train_data_dir: str | None = _f(None, "Imagefolder with metadata.jsonl/.csv (captions).")
    image_column: str = _f("image", "Column holding the images.")
    caption_column: str = _f(
        "text", "Column holding the captions (str or list of str); prior only."
    )
    max_train_samples: int | None = _f(None, "Truncate the dataset to this many examples.")
    validation_prompts: list[str] | None = _f(None, "Prompts for validation images.")
    output_dir: str = _f("kandi_2_2-model-finetuned", "Where checkpoints and the model go.")
    cache_dir: str | None = _f(None, "The datasets cache directory.")
    seed: int | None = _f(None, "Seed for reproducible training.")
    resolution: int = _f(512, "Decoder training resolution (multiple of 64); unused by the prior.")
    # --- optimisation -------------------------------------------------------------------------
    train_batch_size: int = _f(1, "Batch size per device.")
    num_train_epochs: int = _f(100, "Epochs (recomputed when --max_train_steps is set).")
    max_train_steps: int | None = _f(None, "Optimizer updates in total; overrides epochs.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    gradient_checkpointing: bool = _f(False, "Recompute activations per block (prior too).")
    learning_rate: float = _f(1e-4, "Initial learning rate (after warm-up).")
    lr_scheduler: str = _f("constant", "LR schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(500, "Warm-up, in optimizer updates.")
    snr_gamma: float | None = _f(None, "Min-SNR weighting gamma (5.0 is the paper's choice).")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (torch backend, needs bitsandbytes).")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere GPUs.")
    use_ema: bool = _f(False, "Keep an EMA of the trained weights; the EMA weights are exported.")
    dataloader_num_workers: int = _f(0, "Data-loading worker processes.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(0.0, "AdamW decoupled weight decay.")
    adam_epsilon: float = _f(1e-08, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm.")
    # --- hub, logging, precision --------------------------------------------------------------
    push_to_hub: bool = _f(False, "Upload the result to the Hugging Face hub.")
    hub_token: str | None = _f(None, "Hub token.")
    hub_model_id: str | None = _f(None, "Hub repo id; unset: the basename of output_dir.")
    logging_dir: str = _f("logs", "Tracker log directory, inside output_dir.")
    mixed_precision: str | None = _f(None, "Mixed precision.", choices=("no", "fp16", "bf16"))
    report_to: str = _f("tensorboard", "Tracker.", choices=REPORT_TO)
    local_rank: int = _f(-1, "Set by the launcher (env LOCAL_RANK wins).")
    # --- checkpoints, validation --------------------------------------------------------------
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer updates.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint path/name.")
    enable_xformers_memory_efficient_attention: bool = _f(False, "xFormers attention (CUDA).")
    validation_epochs: int = _f(5, "Validate every N epochs (and after epoch 0).")
    tracker_project_name: str = _f("text2image-fine-tune", "Tracker project name.")
    # --- DreamBooth (diffusers' train_dreambooth_lora.py) -------------------------------------
    instance_data_dir: str | None = _f(
        None, "DreamBooth: a folder of images of the subject (instead of a dataset)."
    )
    instance_prompt: str | None = _f(
        None, "DreamBooth: the prompt of every instance image, e.g. 'a photo of sks dog'."
    )
    class_data_dir: str | None = _f(
        None, "DreamBooth: class images (generated there first where fewer than asked)."
    )
    class_prompt: str | None = _f(None, "DreamBooth: the prompt of the class images.")
    with_prior_preservation: bool = _f(
        False, "DreamBooth: add class images to every batch, against language drift."
    )
    prior_loss_weight: float = _f(1.0, "DreamBooth: weight of the class images' loss.")
    num_class_images: int = _f(100, "DreamBooth: class images to train with (and generate).")
    sample_batch_size: int = _f(4, "DreamBooth: images per batch when generating class images.")
    class_image_steps: int = _f(
        100, "DreamBooth: decoder denoising steps of generated class images (the pipeline's)."
    )
    # --- ours ---------------------------------------------------------------------------------
    backend: str = _f("flax", "Training backend.", choices=BACKENDS)
    prediction_type: str | None = _f(
        None,
        "Decoder target: epsilon or v_prediction; unset: the decoder scheduler's.",
        choices=("epsilon", "v_prediction"),
    )
    lr_step_rules: str | None = _f(
        None, "piecewise_constant rules, e.g. '1:100,0.1:200,0.01' (multiplier:until_step,...)."
    )
    validation_steps: int = _f(20, "Decoder denoising steps of validation images.")
    mesh_shape: str | None = _f(
        None, "flax: device mesh, e.g. 'data=4,fsdp=2'; unset: every device on 'data'."
    )
    coordinator_address: str | None = _f(
        None, "flax multi-host: host:port of process 0 (TPU pods detect it themselves)."
    )
    num_processes: int | None = _f(None, "flax multi-host: number of processes.")
    process_id: int | None = _f(None, "flax multi-host: this process's index.")
    embeddings_cache: str | None = _f(
        None,
        "Encode-once cache folder: frozen-encoder outputs are computed once and reused across "
        "epochs and runs (invalidated when encoders, preprocessing or data change).",
    )
    image_memory_mb: int = _f(
        1024,
        "Host memory (MB per process) for decoded, resized training images kept from one epoch "
        "to the next, so later epochs skip decoding; 0 decodes every image in every epoch.",
    )
    encoder_memory_mb: int = _f(
        1024,
        "Host memory (MB) for the frozen encoders' outputs kept from one epoch to the next, so "
        "later epochs skip the encoders; 0 encodes every batch in every epoch. Single-process "
        "runs without --embeddings_cache.",
    )
    compile_cache_dir: str | None = _f(
        "~/.cache/kandinsky_finetune/jax_compile",
        "flax: persistent XLA compilation cache and the traced step's stored program ('' to "
        "disable both).",
    )
    attention: str = _f(
        "dot",
        "flax: attention kernel; 'chunked' bounds memory at long token counts (UNet at 768 px).",
        choices=("dot", "chunked"),
    )
    skip_nonfinite_updates: bool = _f(
        False,
        "Skip an update whose loss or gradient norm is NaN/Inf (the weights, optimizer, LR "
        "schedule and EMA stay as they were) and count it, instead of stopping the run.",
    )


DREAMBOOTH_FLAGS = (  # diffusers' DreamBooth scripts', not its text-to-image ones
    "instance_data_dir",
    "instance_prompt",
    "class_data_dir",
    "class_prompt",
    "with_prior_preservation",
    "prior_loss_weight",
    "num_class_images",
    "sample_batch_size",
)
OUR_DREAMBOOTH_FLAGS = ("class_image_steps",)
OUR_FLAGS = (
    *DREAMBOOTH_FLAGS,
    *OUR_DREAMBOOTH_FLAGS,
    "backend",
    "prediction_type",
    "lr_step_rules",
    "validation_steps",
    "mesh_shape",
    "coordinator_address",
    "num_processes",
    "process_id",
    "embeddings_cache",
    "image_memory_mb",
    "encoder_memory_mb",
    "compile_cache_dir",
    "attention",
    "skip_nonfinite_updates",
)
DIFFUSERS_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in OUR_FLAGS)


@dataclass
class LoraTrainConfig(TrainConfig):
    """The flags of the LoRA scripts (`train_text_to_image_lora_{prior,decoder}.py`): every flag
    of the full ones, the reference LoRA scripts' own (`--rank`, `--validation_prompt`,
    `--num_validation_images`, their defaults of `--output_dir` and `--validation_epochs`), and
    ours (`--lora_alpha`, `--merge_lora`)."""

    output_dir: str = _f("kandi_2_2-model-finetuned-lora", "Where checkpoints and the adapter go.")
    validation_epochs: int = _f(1, "Validate every N epochs (and after epoch 0).")
    rank: int = _f(4, "LoRA rank: the inner dimension of each adapter update.")
    validation_prompt: str | None = _f(
        None, "A prompt rendered --num_validation_images times at each validation."
    )
    num_validation_images: int = _f(4, "Images of --validation_prompt per validation.")
    lora_alpha: float | None = _f(
        None, "LoRA alpha: updates are scaled by alpha / rank; unset: alpha = rank (scale 1)."
    )
    merge_lora: bool = _f(
        False,
        "Also write the full pipeline folder with the adapter merged into the network, beside "
        "the adapter file.",
    )


def config_class(lora: bool) -> type[TrainConfig]:
    return LoraTrainConfig if lora else TrainConfig


def config_from_record(record: dict) -> TrainConfig:
    """The TrainConfig a checkpoint recorded (a LoRA run's records its rank)."""
    return config_class("rank" in record)(**record)


def script_name(stage: str, lora: bool = False) -> str:
    return f"train_text_to_image_{'lora_' if lora else ''}{stage}.py"


def _hf_argument_parser() -> type:
    """transformers.HfArgumentParser, from its own file when transformers is not imported yet.

    hf_argparser.py imports only the standard library and yaml. Should a release of transformers
    give it other imports, or move it, the package is imported as usual."""
    if "transformers" not in sys.modules:
        spec = importlib.util.find_spec("transformers")  # finds the package, runs none of it
        origin = spec.origin if spec is not None else None
        path = Path(origin).parent / "hf_argparser.py" if origin else None
        if path is not None and path.is_file():
            module_spec = importlib.util.spec_from_file_location(
                "kandinsky_common._hf_argparser", path
            )
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
                return module.HfArgumentParser
            except (ImportError, AttributeError):
                pass
    from transformers import HfArgumentParser

    return HfArgumentParser


class _Parser(_hf_argument_parser()):
    """argparse reports mistakes as usage + message + exit 2; we want one `error:` line."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _description(stage: str, lora: bool = False) -> str:
    what = (
        f"Train a LoRA adapter of the Kandinsky 2.2 {stage}"
        if lora
        else (f"Fine-tune the Kandinsky 2.2 {stage}")
    )
    return (
        f"{what} with the flags of diffusers' {script_name(stage, lora)}, plus --backend "
        "flax|torch and the flags marked (ours) in docs/flags.md. Flags may also come from a JSON "
        "or YAML file given first (keys are flag names); flags after it override the file."
    )


def resolve_paths(cfg: TrainConfig) -> None:
    """Make every path flag absolute, once, so that no later code depends on the working
    directory (orbax refuses relative paths; a subprocess or chdir would reinterpret them).

    `~` is expanded everywhere. Folders that may be hub names (models, `--dataset_name`) become
    absolute only when they exist here, so a hub name still reaches the "not a local folder"
    message as typed. `--logging_dir` is relative to output_dir, as in diffusers.
    `--resume_from_checkpoint` becomes absolute when it names an existing path; otherwise it is a
    checkpoint name inside output_dir (or 'latest').
    """

    def absolute_if_here(p: str | None) -> str | None:
        if p is None or not os.path.exists(os.path.expanduser(p)):
            return p
        return user_path(p)

    cfg.output_dir = user_path(cfg.output_dir)
    if is_url(cfg.logging_dir):
        cfg.logging_dir = user_path(cfg.logging_dir)
    else:
        cfg.logging_dir = os.path.join(cfg.output_dir, os.path.expanduser(cfg.logging_dir))
    for name in (
        "train_data_dir",
        "embeddings_cache",
        "cache_dir",
        "instance_data_dir",
        "class_data_dir",
    ):
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, user_path(value))
    if cfg.compile_cache_dir:  # '' disables the cache
        cfg.compile_cache_dir = user_path(cfg.compile_cache_dir)
    for name in (
        "pretrained_prior_model_name_or_path",
        "pretrained_decoder_model_name_or_path",
        "dataset_name",
    ):
        setattr(cfg, name, absolute_if_here(getattr(cfg, name)))
    if cfg.resume_from_checkpoint not in (None, "latest"):
        cfg.resume_from_checkpoint = absolute_if_here(cfg.resume_from_checkpoint)


def parse_config(argv: list[str] | None, stage: str, lora: bool = False) -> TrainConfig:
    """Flags, or a .json/.yaml file followed by flags that override it, -> a validated
    TrainConfig (LoraTrainConfig with `lora`) for `stage` with absolute paths."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_cls = config_class(lora)
    parser = _Parser(
        config_cls, prog=script_name(stage, lora), description=_description(stage, lora)
    )
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        path = Path(argv[0]).expanduser()
        try:
            file_argv = file_to_argv(path, load_config_file(path), config_cls)
            (cfg, rest) = parser.parse_args_into_dataclasses(
                args=file_argv, return_remaining_strings=True
            )
        except UserError as e:
            if str(e).startswith("config file"):
                raise
            raise UserError(f"config file {path}: {e}") from e
        argv = file_argv + argv[1:]
    (cfg, rest) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)} (see --help)")
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        cfg.local_rank = env_rank
    resolve_paths(cfg)
    validate(cfg, stage)
    if lora:
        validate_lora(cfg)
    return cfg
