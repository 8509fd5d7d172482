"""The one training loop of the torch backend: data -> step -> log -> checkpoint -> export.

Mirrors flax_kandinsky/training/loop.py: `configure_torch` sets the process-wide options the flags
ask for, `set_up` builds everything a run holds (failing on user input before output_dir is
touched), `run_updates` is the loop, and `finish` exports and summarises; `train` runs the four.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from kandinsky_common import checkpoints as ckpt_files
from kandinsky_common import noise as noise_stream
from kandinsky_common.dreambooth import fill_class_images
from kandinsky_common.errors import UserError
from kandinsky_common.flags import TrainConfig
from kandinsky_common.hub import check_hub, push_folder
from kandinsky_common.preemption import PreemptionGuard
from kandinsky_common.run import NOTHING_LEFT, RunPlan, out_of_memory, plan_run, write_summary
from torch_kandinsky.checkpoint import CheckpointStore
from torch_kandinsky.sampling import memory_failure
from torch_kandinsky.stages import make_stage
from torch_kandinsky.training.optim import (
    apply_optimizer_flags,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
)
from torch_kandinsky.training.step import SkippedUpdates, any_process, train_step
from torch_kandinsky.validation import Validator, class_image_generator

DTYPES = {None: torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Updates(torch.utils.data.Dataset):
    """Update k of the run -> its micro-batches, numpy (so DataLoader workers can prefetch)."""

    def __init__(self, plan, first: int):
        self.plan, self.first = plan, first

    def __len__(self):
        return self.plan.max_train_steps - self.first

    def __getitem__(self, k):
        update = self.first + k
        accum = self.plan.accum
        return [self.plan.batch(m) for m in range(update * accum, (update + 1) * accum)]


def _check_environment(cfg: TrainConfig) -> None:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 (or no) on this machine")
    for name in ("wandb", "comet_ml"):
        if cfg.report_to == name and importlib.util.find_spec(name) is None:
            raise UserError(f"--report_to {name} needs `pip install {name}`; or use tensorboard")


def configure_torch(cfg: TrainConfig) -> Accelerator:
    """The process-wide settings the flags ask for, and the run's Accelerator (which joins the
    processes torchrun or accelerate launched)."""
    _check_environment(cfg)
    # accelerate keeps process-wide singletons; a second run in one process (tests, notebooks)
    # must not inherit the first run's accumulation settings.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    out = Path(cfg.output_dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=project,
    )
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.enable_xformers_memory_efficient_attention:
        _check_xformers(accelerator.device)
    return accelerator


@dataclass
class Run:
    """What a training job holds from set-up to export.

    Parameters:
        cfg, stage, plan: the flags, the Stage being trained and the RunPlan (data, steps, resume).
        accelerator: the run's Accelerator; model, optimizer: prepared by it.
        lr_scheduler, ema: the LR schedule and the EMA (None without --use_ema).
        store: the run's CheckpointStore; global_step: updates done so far.
        skips: the count of skipped updates under --skip_nonfinite_updates, else None.
    """

    cfg: TrainConfig
    stage: Any
    plan: RunPlan
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    store: CheckpointStore
    global_step: int = 0
    skips: SkippedUpdates | None = None
    losses: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)  # when each update ended (benchmarks)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def set_up(cfg: TrainConfig, stage_name: str, accelerator: Accelerator) -> Run:
    """Stage, data plan, prepared model and optimizer (restored when resuming). Everything that
    can fail on user input happens here, before output_dir is touched."""
    if cfg.push_to_hub:
        check_hub(cfg)
    stage = make_stage(cfg, stage_name, accelerator.device, DTYPES[cfg.mixed_precision])
    if cfg.with_prior_preservation:  # DreamBooth: the class images the folder lacks, first
        main = accelerator.is_main_process
        fill_class_images(
            cfg,
            lambda: class_image_generator(cfg, accelerator.device),
            is_main=main,
            barrier=accelerator.wait_for_everyone,
            memory_failure=memory_failure,
        )
    plan = plan_run(
        cfg,
        stage.spec,
        "torch",
        tokenizer=getattr(stage, "tokenizer", None),
        prior_folder=stage.prior_folder,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        memo_copies=cfg.dataloader_num_workers,  # each worker process keeps its own
    )
    if cfg.embeddings_cache:
        plan.use_cache(
            lambda batch: _encode_numpy(stage, batch, accelerator.device),
            process_index=accelerator.process_index,
            process_count=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone,
        )
    model = stage.model
    if cfg.gradient_checkpointing:
        stage.enable_gradient_checkpointing(model)
    if cfg.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    model.train()
    optimizer = make_optimizer(cfg, model)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, plan.max_train_steps)
    ema = make_ema(model) if cfg.use_ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    out = Path(cfg.output_dir)
    store = CheckpointStore(
        accelerator, out, cfg.checkpoints_total_limit, stage.spec.model_subfolder, stage.lora
    )
    run = Run(cfg, stage, plan, accelerator, model, optimizer, lr_scheduler, ema, store)
    resumed = None
    if plan.resume is not None:
        # 'latest' falls back past damaged checkpoints (warning); plan.resume follows.
        resumed = store.resume(plan, model, cfg.resume_from_checkpoint)
        apply_optimizer_flags(cfg, optimizer, lr_scheduler)
        run.global_step = resumed["global_step"]
        accelerator.print(f"resumed from {plan.resume} at update {run.global_step}")
        if plan.finished:
            accelerator.print(NOTHING_LEFT.format(step=run.global_step, out=out))
    if cfg.skip_nonfinite_updates:
        run.skips = SkippedUpdates((resumed or {}).get("skipped_updates", 0))
    return run


def open_trackers(run: Run) -> None:
    """accelerate's trackers, on the main process (output_dir exists by then)."""
    if run.accelerator.is_main_process:
        tracker_cfg = {
            k: (v if isinstance(v, int | float | str | bool) else str(v))
            for k, v in dataclasses.asdict(run.cfg).items()
            if k != "validation_prompts"
        }
        run.accelerator.init_trackers(run.cfg.tracker_project_name, tracker_cfg)


def run_updates(run: Run, validator: Validator) -> str | None:
    """Train from run.global_step to the plan's end, checkpointing when due; returns the name of
    what stopped it early (a checkpoint is saved first), or None."""
    cfg, plan, stage, acc = run.cfg, run.plan, run.stage, run.accelerator
    accum, first = plan.accum, run.global_step
    loader = torch.utils.data.DataLoader(
        _Updates(plan, first),
        batch_size=None,
        num_workers=cfg.dataloader_num_workers,
        collate_fn=lambda b: b,
    )
    bar = tqdm(
        total=plan.max_train_steps,
        initial=first,
        desc=f"{stage.spec.name} (torch)",
        disable=not acc.is_local_main_process,
    )
    shape = stage.x0_shape(cfg.train_batch_size * plan.batch_factor, cfg.resolution)
    pid, num_timesteps = acc.process_index, stage.schedule.num_train_timesteps

    def encode(batch):  # --encoder_memory_mb: the first epoch encodes here, in the main process
        return _encode_numpy(stage, batch, acc.device)

    try:
        with PreemptionGuard(sigint=True) as guard:
            for update, batches in enumerate(loader, start=first):
                micros = range(update * accum, (update + 1) * accum)
                if plan.memo is not None:
                    batches = [plan.encoded_batch(m, b, encode) for m, b in zip(micros, batches)]
                draws = (noise_stream.draw(plan.seed, m, pid, shape, num_timesteps) for m in micros)
                loss = train_step(
                    acc,
                    stage,
                    run.model,
                    run.optimizer,
                    run.lr_scheduler,
                    run.ema,
                    [(batch, *draw) for batch, draw in zip(batches, draws)],
                    max_grad_norm=cfg.max_grad_norm,
                    snr_gamma=cfg.snr_gamma,
                    encoded=plan.cache is not None or plan.memo is not None,
                    skip=run.skips,
                )
                run.global_step = step = update + 1
                train_loss = acc.gather(torch.tensor(loss, device=acc.device)).mean().item()
                run.losses.append(train_loss)
                run.done.append(time.perf_counter())
                lr = run.lr_scheduler.get_last_lr()[0]
                acc.log({"train_loss": train_loss, "lr": lr}, step=step)
                samples = (step - first) * accum * cfg.train_batch_size * acc.num_processes
                rate = samples / (time.perf_counter() - run.t0)
                bar.update(1)
                bar.set_postfix(
                    step_loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}"
                )
                stop = any_process(acc, guard.requested)
                if step % cfg.checkpointing_steps == 0 or step == plan.max_train_steps or stop:
                    meta = plan.state(step, **_skip_state(run.skips))
                    run.store.save(step, run.model, meta, ema=run.ema)
                if stop:  # all processes stop here, whichever of them got the signal
                    return guard.signal_name or "a signal to another process"
                # The last update is validated once, after the export, with the final weights.
                if step != plan.max_train_steps and plan.validation_due(micros):
                    validator(run.model, step, run.ema)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one too
        what = memory_failure(e)
        if what is None:
            raise
        raise out_of_memory(cfg, stage.spec.name, what) from None
    finally:
        bar.close()  # so an error line starts on a line of its own
    return None


def finish(run: Run, validator: Validator, stopped_by: str | None) -> dict:
    """Export the trained network (and validate it) or, when stopped early, say how to resume;
    returns the run's summary."""
    cfg, acc, out = run.cfg, run.accelerator, run.out
    acc.wait_for_everyone()
    summary = {
        "stage": run.stage.spec.name,
        "backend": "torch",
        "updates": run.global_step,
        **_skip_state(run.skips),
    }
    if stopped_by is not None:
        acc.print(
            f"stopped by {stopped_by} after update {run.global_step}; resume "
            "with --resume_from_checkpoint latest"
        )
        acc.end_training()
        return {**summary, "preempted": True, "stopped_by": stopped_by}
    if acc.is_main_process:
        final = acc.unwrap_model(run.model)
        if run.ema is not None:
            run.ema.copy_to(final.parameters())
        try:
            run.stage.export(final, out)
        except OSError as e:  # the last checkpoint is complete: a resumed run only exports
            what = "the final pipeline folder"
            raise ckpt_files.write_failed(out / "export", e, "torch", what=what) from e
        if cfg.validation_prompts:
            validator(run.model, run.global_step)
        summary.update(seconds=round(time.perf_counter() - run.t0, 2), output_dir=str(out))
        write_summary(out, summary, run.losses)
        summary["losses"] = run.losses  # in-process callers (tests) get every update's loss
        summary["update_seconds"] = np.diff([run.t0, *run.done]).tolist()
        if cfg.push_to_hub:
            push_folder(cfg)
    acc.end_training()
    return summary


def train(cfg: TrainConfig, stage_name: str) -> dict:
    """Run a whole training job; returns a summary (losses, paths). Raises UserError early."""
    accelerator = configure_torch(cfg)
    run = set_up(cfg, stage_name, accelerator)
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
    open_trackers(run)
    validator = Validator(cfg, run.stage, accelerator)
    stopped_by = run_updates(run, validator)
    return finish(run, validator, stopped_by)


def _skip_state(skips) -> dict:
    """--skip_nonfinite_updates: the count, for the summary and the checkpoint's state."""
    return {} if skips is None else {"skipped_updates": skips.count}


def _encode_numpy(stage, batch, device) -> dict[str, np.ndarray]:
    """Frozen-encoder outputs of a numpy batch, as numpy (float32 or bool) for the cache."""
    batch = {k: v for k, v in batch.items() if k != "loss_weight"}
    enc = stage.encode(stage.to_device(batch, device, stage.weight_dtype))
    return {
        k: v.cpu().numpy() if v.dtype == torch.bool else v.float().cpu().numpy()
        for k, v in enc.items()
    }


def _check_xformers(device: torch.device) -> None:
    if importlib.util.find_spec("xformers") is None:
        raise UserError(
            "--enable_xformers_memory_efficient_attention needs xformers (`pip install xformers`); "
            "without it PyTorch's SDPA attention is used, which is already memory-efficient"
        )
    if device.type != "cuda":
        raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU")
