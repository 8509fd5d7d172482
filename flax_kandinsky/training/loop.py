"""The one training loop of the flax backend: data -> jitted step -> log -> checkpoint -> export."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from flax_kandinsky import sharding as sh
from flax_kandinsky.checkpoint import CheckpointStore
from flax_kandinsky.sampling import memory_failure
from flax_kandinsky.stages import make_stage
from flax_kandinsky.training.optim import make_optimizer
from flax_kandinsky.training.step import encode_frozen, init_state, make_train_step, split_stage
from flax_kandinsky.validation import Validator
from kandinsky_common import noise as noise_stream
from kandinsky_common.checkpoints import write_failed
from kandinsky_common.errors import NonFiniteLoss
from kandinsky_common.flags import TrainConfig
from kandinsky_common.hub import check_hub, push_folder
from kandinsky_common.lr_schedules import learning_rate_at
from kandinsky_common.preemption import PreemptionGuard
from kandinsky_common.prefetch import Prefetcher
from kandinsky_common.run import NOTHING_LEFT, RunPlan, out_of_memory, plan_run, write_summary
from kandinsky_common.tracking import Tracker


def init_distributed(cfg: TrainConfig) -> None:
    """Multi-host: explicit flags, or a TPU pod's own environment. Single host: nothing."""
    if cfg.coordinator_address or cfg.num_processes:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def host_batches(plan: RunPlan, stage, first_update: int, shape: tuple[int, ...]):
    """Per update: this process's (batch, noise, timesteps), micro-batches stacked on axis 0."""
    pid = jax.process_index()
    for update in range(first_update, plan.max_train_steps):
        micros = range(update * plan.accum, (update + 1) * plan.accum)
        batches = [plan.batch(m) for m in micros]
        draws = [
            noise_stream.draw(plan.seed, m, pid, shape, stage.schedule.num_train_timesteps)
            for m in micros
        ]
        batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        noise = np.stack([stage.noise_layout(n) for n, _ in draws])  # (accum, B, ...)
        timesteps = np.stack([t for _, t in draws])  # (accum, B)
        yield update, batch, noise, timesteps


def device_batches(mesh, batches):
    """Host batches -> global jax.Arrays. Run on the prefetch thread, so the host-to-device copy of
    the next update's batch overlaps the current step instead of preceding the next dispatch."""
    for update, batch, noise, timesteps in batches:
        g = sh.global_batch(mesh, {"batch": batch, "noise": noise, "t": timesteps})
        yield update, g["batch"], g["noise"], g["t"]


def _agreed(requested: bool) -> bool:
    """Every process stops at the same update if any of them was asked to (a SIGTERM reaches
    the hosts of a pod at slightly different times)."""
    if jax.process_count() == 1:
        return requested
    return bool(np.any(multihost_utils.process_allgather(np.array([requested]))))


def _gather_to_host(tree):
    """Full numpy copy of a (possibly multi-host sharded) pytree; every process must call it."""
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


def train(cfg: TrainConfig, stage_name: str) -> dict:
    """Run a whole training job; returns a summary (losses, paths). Raises UserError early."""
    init_distributed(cfg)
    if cfg.push_to_hub:
        check_hub(cfg)
    if cfg.allow_tf32:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    if cfg.compile_cache_dir:
        # A warm cache turns minutes of XLA compilation of a real-size step into seconds.
        jax.config.update(
            "jax_compilation_cache_dir", str(Path(cfg.compile_cache_dir).expanduser())
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    mesh = sh.make_mesh(cfg.mesh_shape)
    main = jax.process_index() == 0

    # Everything that can fail on user input happens before output_dir is touched.
    stage = make_stage(cfg, stage_name)
    plan = plan_run(
        cfg,
        stage.spec,
        "flax",
        tokenizer=getattr(stage, "tokenizer", None),
        prior_folder=stage.prior_folder,
        num_processes=jax.process_count(),
        process_index=jax.process_index(),
        per_process_batch=cfg.train_batch_size * mesh.local_mesh.size,
        builder_threads=max(1, cfg.dataloader_num_workers),
    )
    out = Path(cfg.output_dir)
    graphdefs, params, consts = split_stage(stage)
    if cfg.embeddings_cache:
        encode = jax.jit(lambda c, b: stage.to_reference(encode_frozen(stage, graphdefs, c, b)))
        plan.use_cache(
            cfg,
            lambda batch: jax.tree.map(np.asarray, encode(consts, batch)),
            is_main=main,
            barrier=lambda: multihost_utils.sync_global_devices("embeddings_cache"),
        )
        consts = {"model_rest": consts["model_rest"]}  # the encoders never reach the devices
    tx = make_optimizer(cfg, plan.max_train_steps)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, cfg.use_ema), params)
    step = make_train_step(
        stage,
        graphdefs,
        tx,
        mesh,
        abstract,
        consts,
        snr_gamma=cfg.snr_gamma,
        use_ema=cfg.use_ema,
        encoded=plan.cache is not None,
        skip_nonfinite=cfg.skip_nonfinite_updates,
    )
    consts = jax.device_put(consts, step.const_shardings)
    params = jax.device_put(params, step.state_shardings["params"])
    state = jax.jit(lambda p: init_state(p, tx, cfg.use_ema), out_shardings=step.state_shardings)(
        params
    )
    del params
    store = CheckpointStore(out, cfg.checkpoints_total_limit)
    global_step, skipped = 0, 0
    if plan.resume is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            step.state_shardings,
        )
        # 'latest' falls back past damaged checkpoints with a warning; an explicit one must read.
        state, meta = store.resume(cfg.resume_from_checkpoint, target, stage=stage_name)
        global_step = int(meta["global_step"])
        skipped = int(meta.get("skipped_updates", 0))
        if main:
            print(f"resumed from {store.path(global_step)} at update {global_step}")
            if plan.finished:
                print(NOTHING_LEFT.format(step=global_step, out=out))
    tracker = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        tracker_cfg = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
        tracker = (
            # accelerate's layout (the torch backend's and the reference's): one tensorboard
            # opened on logs/ shows runs of both backends side by side.
            Tracker(
                cfg.report_to,
                Path(cfg.logging_dir) / cfg.tracker_project_name,
                cfg.tracker_project_name,
                tracker_cfg,
            )
            if cfg.report_to != "none"
            else None
        )

    local_b = cfg.train_batch_size * mesh.local_mesh.size
    shape = stage.x0_shape(local_b, cfg.resolution)
    bar = tqdm(
        total=plan.max_train_steps,
        initial=global_step,
        desc=f"{stage_name} (flax)",
        disable=not main,
    )
    losses, t0, samples = [], time.perf_counter(), 0
    done = []  # when each update's metrics arrived: per-update wall times for benchmarks
    pending = None  # metrics of the previous update, read after the next one is dispatched

    def finish(update, metrics):
        nonlocal skipped
        loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if "skipped" in metrics:
            skipped += int(metrics["skipped"])
        elif not (np.isfinite(loss) and np.isfinite(norm)):
            what = f"loss became {loss}" if not np.isfinite(loss) else f"grad norm became {norm}"
            raise NonFiniteLoss(
                f"the {what} at optimizer update {update}; lower --learning_rate and resume from "
                f"the last checkpoint in {out}, or pass --skip_nonfinite_updates"
            )
        losses.append(loss)
        done.append(time.perf_counter())
        lr = learning_rate_at(cfg, plan.max_train_steps, update)  # as torch get_last_lr()
        if tracker is not None:
            tracker.scalars({"train_loss": loss, "lr": lr}, update)
        rate = samples / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(step_loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")

    preempted = False
    validate = Validator(cfg, stage)
    source = Prefetcher(device_batches(mesh, host_batches(plan, stage, global_step, shape)), 2)
    try:
        with PreemptionGuard(sigint=True) as guard:
            for update, g_batch, g_noise, g_t in source:
                state, metrics = step.fn(state, consts, g_batch, g_noise, g_t)
                global_step = update + 1
                samples += plan.accum * plan.sampler.global_batch
                if pending is not None:
                    finish(*pending)
                pending = (global_step, metrics)
                due = global_step % cfg.checkpointing_steps == 0
                stop = _agreed(guard.requested)
                if due or global_step == plan.max_train_steps or stop:
                    finish(*pending)
                    pending = None
                    extra = {"skipped_updates": skipped} if cfg.skip_nonfinite_updates else {}
                    store.save(global_step, state, plan.state(global_step, cfg, **extra))
                if stop:
                    preempted = True
                    break
                # The last update is validated once, after the export, with the final weights.
                last = global_step == plan.max_train_steps
                micros = range(update * plan.accum, global_step * plan.accum)
                if not last and plan.validation_due(cfg, micros):
                    weights = _gather_to_host(state["ema"] if cfg.use_ema else state["params"])
                    if main:
                        validate(weights, global_step, tracker)
            if pending is not None:
                finish(*pending)
    except Exception as e:
        what = memory_failure(e)
        if what is None:
            raise
        raise out_of_memory(cfg, stage_name, what) from None
    finally:
        source.close()
        bar.close()  # so an error line starts on a line of its own
        store.wait()

    summary = {"stage": stage_name, "backend": "flax", "updates": global_step}
    if cfg.skip_nonfinite_updates:
        summary["skipped_updates"] = skipped
    if preempted:
        if main:
            print(
                f"stopped by {guard.signal_name} after update {global_step}; resume with "
                "--resume_from_checkpoint latest"
            )
        summary.update(preempted=True, stopped_by=guard.signal_name)
        store.close()
        return summary
    final = _gather_to_host(state["ema"] if cfg.use_ema else state["params"])
    store.close()
    if main:
        model = stage.model
        nnx.update(model, final)
        try:
            stage.export(model, out)
        except OSError as e:  # the last checkpoint is complete: a resumed run only exports
            raise write_failed(out / "export", e, "flax", what="the final pipeline folder") from e
        if cfg.validation_prompts:
            validate(final, global_step, tracker)
        summary.update(seconds=round(time.perf_counter() - t0, 2), output_dir=str(out))
        write_summary(out, summary, losses)
        summary["losses"] = losses  # in-process callers (tests) get every update's loss
        summary["update_seconds"] = np.diff([t0, *done]).tolist()
        if tracker is not None:
            tracker.close()
        if cfg.push_to_hub:
            push_folder(cfg)
    return summary
