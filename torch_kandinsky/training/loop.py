"""The one training loop of the torch backend: data -> step -> log -> checkpoint -> export."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from kandinsky_common import checkpoints as ckpt_files
from kandinsky_common import noise as noise_stream
from kandinsky_common.errors import UserError
from kandinsky_common.flags import TrainConfig
from kandinsky_common.hub import check_hub, push_folder
from kandinsky_common.preemption import PreemptionGuard
from kandinsky_common.run import NOTHING_LEFT, out_of_memory, plan_run, write_summary
from torch_kandinsky.checkpoint import CheckpointStore
from torch_kandinsky.stages import make_stage
from torch_kandinsky.training.optim import (
    make_ema,
    make_lr_scheduler,
    make_optimizer,
)
from torch_kandinsky.training.step import SkippedUpdates, any_process, train_step
from torch_kandinsky.validation import Validator

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


def train(cfg: TrainConfig, stage_name: str) -> dict:
    """Run a whole training job; returns a summary (losses, paths). Raises UserError early."""
    _check_environment(cfg)
    if cfg.push_to_hub:
        check_hub(cfg)
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
    weight_dtype = DTYPES[cfg.mixed_precision]
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.enable_xformers_memory_efficient_attention:
        _check_xformers(accelerator.device)

    # Everything that can fail on user input happens before output_dir is touched.
    stage = make_stage(cfg, stage_name, accelerator.device, weight_dtype)
    plan = plan_run(
        cfg,
        stage.spec,
        "torch",
        tokenizer=getattr(stage, "tokenizer", None),
        prior_folder=stage.prior_folder,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
    )
    accum, max_train_steps = plan.accum, plan.max_train_steps
    if cfg.embeddings_cache:
        plan.use_cache(
            lambda batch: _encode_numpy(stage, batch, accelerator.device),
            is_main=accelerator.is_main_process,
            barrier=accelerator.wait_for_everyone,
        )

    model = stage.model
    if cfg.gradient_checkpointing:
        stage.enable_gradient_checkpointing(model)
    if cfg.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    model.train()
    optimizer = make_optimizer(cfg, model)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, max_train_steps)
    ema = make_ema(model) if cfg.use_ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    store = CheckpointStore(
        accelerator, out, cfg.checkpoints_total_limit, stage.spec.model_subfolder
    )
    global_step, resumed = 0, None
    if plan.resume is not None:
        # 'latest' falls back past damaged checkpoints (warning); plan.resume follows.
        resumed = store.resume(plan, model, cfg.resume_from_checkpoint)
        global_step = resumed["global_step"]
        accelerator.print(f"resumed from {plan.resume} at update {global_step}")
        if plan.finished:
            accelerator.print(NOTHING_LEFT.format(step=global_step, out=out))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        tracker_cfg = {
            k: (v if isinstance(v, int | float | str | bool) else str(v))
            for k, v in dataclasses.asdict(cfg).items()
            if k != "validation_prompts"
        }
        accelerator.init_trackers(cfg.tracker_project_name, tracker_cfg)

    first = global_step  # the next update to run
    loader = torch.utils.data.DataLoader(
        _Updates(plan, first),
        batch_size=None,
        num_workers=cfg.dataloader_num_workers,
        collate_fn=lambda b: b,
    )
    bar = tqdm(
        total=max_train_steps,
        initial=global_step,
        desc=f"{stage_name} (torch)",
        disable=not accelerator.is_local_main_process,
    )
    losses, t0 = [], time.perf_counter()
    done = []  # when each update finished: per-update wall times for benchmarks
    shape = stage.x0_shape(cfg.train_batch_size, cfg.resolution)
    skips = None
    if cfg.skip_nonfinite_updates:
        skips = SkippedUpdates((resumed or {}).get("skipped_updates", 0))
    preempted = False
    validate = Validator(cfg, stage, accelerator)
    guard = PreemptionGuard(sigint=True)
    try:
        guard.__enter__()
        for update, batches in enumerate(loader, start=first):
            micros = range(update * accum, (update + 1) * accum)
            draws = (
                noise_stream.draw(
                    plan.seed,
                    m,
                    accelerator.process_index,
                    shape,
                    stage.schedule.num_train_timesteps,
                )
                for m in micros
            )
            loss = train_step(
                accelerator,
                stage,
                model,
                optimizer,
                lr_scheduler,
                ema,
                [(batch, *draw) for batch, draw in zip(batches, draws)],
                max_grad_norm=cfg.max_grad_norm,
                snr_gamma=cfg.snr_gamma,
                encoded=plan.cache is not None,
                skip=skips,
            )
            global_step = update + 1
            mean = torch.tensor(loss, device=accelerator.device)
            train_loss = accelerator.gather(mean).mean().item()
            losses.append(train_loss)
            done.append(time.perf_counter())
            lr = lr_scheduler.get_last_lr()[0]
            accelerator.log({"train_loss": train_loss, "lr": lr}, step=global_step)
            samples = (global_step - first) * accum * cfg.train_batch_size
            rate = samples * accelerator.num_processes / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(step_loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            stop = any_process(accelerator, guard.requested)
            due = global_step % cfg.checkpointing_steps == 0
            if due or global_step == max_train_steps or stop:
                meta = plan.state(global_step, **_skip_state(skips))
                store.save(global_step, model, meta, ema=ema)
            if stop:  # preemption: the checkpoint is saved, the job ends cleanly
                preempted = True
                break
            # The last update is validated once, after the export, with the final weights.
            if global_step != max_train_steps and plan.validation_due(micros):
                validate(model, global_step, ema)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one too
        what = _memory_failure(e)
        if what is None:
            raise
        raise out_of_memory(cfg, stage_name, what) from None
    finally:
        guard.__exit__(None, None, None)
        bar.close()  # so an error line starts on a line of its own

    accelerator.wait_for_everyone()
    summary = {
        "stage": stage_name,
        "backend": "torch",
        "updates": global_step,
        **_skip_state(skips),
    }
    if preempted:
        # All processes stop together, whichever of them got the signal.
        stopped_by = guard.signal_name or "a signal to another process"
        accelerator.print(
            f"stopped by {stopped_by} after update {global_step}; resume "
            "with --resume_from_checkpoint latest"
        )
        accelerator.end_training()
        return {**summary, "preempted": True, "stopped_by": stopped_by}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(final.parameters())
        try:
            stage.export(final, cfg.output_dir)
        except OSError as e:  # the last checkpoint is complete: a resumed run only exports
            out = Path(cfg.output_dir) / "export"
            raise ckpt_files.write_failed(out, e, "torch", what="the final pipeline folder") from e
        if cfg.validation_prompts:
            validate(model, global_step)
        elapsed = time.perf_counter() - t0
        summary.update(seconds=round(elapsed, 2), output_dir=str(out))
        write_summary(out, summary, losses)
        summary["losses"] = losses  # in-process callers (tests) get every update's loss
        summary["update_seconds"] = np.diff([t0, *done]).tolist()
        if cfg.push_to_hub:
            push_folder(cfg)
    accelerator.end_training()
    return summary


def _memory_failure(e: RuntimeError) -> str | None:
    """What ran out when `e` is a failed allocation (CUDA or the CPU allocator), else None."""
    if isinstance(e, torch.OutOfMemoryError):
        return "GPU memory"
    if "can't allocate memory" in str(e) or "DefaultCPUAllocator" in str(e):
        return "host memory (RAM)"
    return None


def _skip_state(skips) -> dict:
    """--skip_nonfinite_updates: the count, for the summary and the checkpoint's state."""
    return {} if skips is None else {"skipped_updates": skips.count}


def _encode_numpy(stage, batch, device) -> dict[str, np.ndarray]:
    """Frozen-encoder outputs of a numpy batch, as numpy (float32 or bool) for the cache."""
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
