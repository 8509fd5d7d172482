"""The one training loop of the flax backend: data -> compiled step -> log -> checkpoint -> export.

`start.begin` sets the process-wide JAX options the flags ask for (and may begin loading the
step's executable), `set_up` builds everything a run holds (failing on user input before
output_dir is touched, the step compiled ahead of time), `run_updates` is the loop, and `finish`
exports and summarises; `train` runs the four.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from flax_kandinsky import sharding as sh
from flax_kandinsky.checkpoint import CheckpointStore
from flax_kandinsky.hosts import agreed, check_shared
from flax_kandinsky.sampling import memory_failure
from flax_kandinsky.stages import encoder_dtype, make_stage
from flax_kandinsky.training.optim import LRSchedule, hyperparameters, make_optimizer
from flax_kandinsky.training.start import StepPreload, begin
from flax_kandinsky.training.step import (
    abstract_inputs,
    encode_frozen,
    init_state,
    make_encoder,
    make_train_step,
    split_stage,
    step_hyperparameters,
)
from flax_kandinsky.training.stored_step import compile_stored, step_key, steps_folder
from flax_kandinsky.validation import Validator, class_image_generator
from kandinsky_common import noise as noise_stream
from kandinsky_common.checkpoints import write_failed
from kandinsky_common.dreambooth import fill_class_images
from kandinsky_common.errors import NonFiniteLoss
from kandinsky_common.flags import TrainConfig
from kandinsky_common.hub import check_hub, push_folder
from kandinsky_common.preemption import PreemptionGuard
from kandinsky_common.prefetch import Prefetcher
from kandinsky_common.run import NOTHING_LEFT, RunPlan, out_of_memory, plan_run, write_summary
from kandinsky_common.storage import location
from kandinsky_common.tracking import Tracker


def host_batches(plan: RunPlan, stage, first_update: int, shape: tuple[int, ...], encode=None):
    """Per update: this process's (batch, noise, timesteps), micro-batches stacked on axis 0.
    With `encode` (the epochs' memo is on), every batch is encoder outputs: kept from an earlier
    epoch, or encoded here and kept."""
    pid = jax.process_index()
    for update in range(first_update, plan.max_train_steps):
        micros = range(update * plan.accum, (update + 1) * plan.accum)
        batches = [plan.batch(m) for m in micros]
        if encode is not None:
            batches = [plan.encoded_batch(m, b, encode) for m, b in zip(micros, batches)]
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


def prefetch(cfg, plan: RunPlan, stage, mesh, first_update: int, encode) -> Prefetcher:
    """The device batches of the updates from `first_update` on, made on a thread of their own."""
    per_process = cfg.train_batch_size * mesh.local_mesh.size * plan.batch_factor
    shape = stage.x0_shape(per_process, cfg.resolution)
    batches = host_batches(plan, stage, first_update, shape, encode)
    return Prefetcher(device_batches(mesh, batches), 2)


def _gather_to_host(tree):
    """Full numpy copy of a (possibly multi-host sharded) pytree; every process must call it."""
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


@dataclass
class Run:
    """What a training job holds from set-up to export.

    Parameters:
        cfg, stage, plan: the flags, the Stage being trained and the RunPlan (data, steps, resume).
        mesh: the device mesh; schedule: the LR schedule the optimizer reads (and the logs show).
        step: the update compiled ahead of time: (state, consts, hyper, batch, noise, t) ->
            (state, metrics).
        state, consts: the sharded training state and the frozen arrays the step reads.
        hyper: the step's constant hyperparameters, on the devices (the LR is added per update).
        store: the run's CheckpointStore; global_step, skipped: updates done and skipped so far.
        encode: numpy batch -> its encoder outputs, when the step reads encoder outputs that
            the loop computes and keeps between epochs (`step.make_encoder`), else None.
        source: the batches of a fresh run, made from before the step was compiled (`prefetch`);
            None once the loop has taken them, or when the loop makes its own (a resumed run).
    """

    cfg: TrainConfig
    stage: Any
    plan: RunPlan
    mesh: Any
    schedule: LRSchedule
    step: Any
    state: Any
    consts: Any
    hyper: dict
    store: CheckpointStore
    encode: Any = None
    source: Prefetcher | None = None
    global_step: int = 0
    skipped: int = 0
    main: bool = field(default_factory=lambda: jax.process_index() == 0)

    @property
    def out(self) -> epath.Path:
        return location(self.cfg.output_dir)

    def hyper_for(self, update: int) -> dict:
        """The step's `hyper` argument for 0-based update `update`: the optimizer's count then is
        update - skipped, or one less if the update still in flight was skipped."""
        count = update - self.skipped
        lr = step_hyperparameters({}, self.schedule, count)
        return {**self.hyper, **sh.global_replicated(self.mesh, lr)}

    def weights(self):
        """The weights to validate or export (EMA when kept), as numpy on every process."""
        return _gather_to_host(self.state["ema"] if self.cfg.use_ema else self.state["params"])


def set_up(cfg: TrainConfig, stage_name: str, preload: StepPreload | None = None) -> Run:
    """Stage, data plan, sharded state (restored when resuming) and the compiled step (from
    `preload` when it loaded the same program). Everything that can fail on user input happens
    here, before output_dir is touched."""
    if cfg.push_to_hub:
        check_hub(cfg)
    mesh = sh.make_mesh(cfg.mesh_shape)
    stage = make_stage(cfg, stage_name)
    if cfg.with_prior_preservation:  # DreamBooth: the class images the folder lacks, first
        fill_class_images(
            cfg,
            lambda: class_image_generator(cfg),
            is_main=jax.process_index() == 0,
            barrier=lambda: multihost_utils.sync_global_devices("class_images"),
            memory_failure=memory_failure,
        )
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
    graphdefs, params, consts = split_stage(stage)
    if cfg.embeddings_cache:
        # Each process encodes its own blocks on its own devices, the batch split among them: a
        # mesh of the local devices keeps every array fully addressable by this process alone.
        local = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
        rows = jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec("batch"))
        frozen = jax.device_put(
            {k: consts[k] for k in stage.frozen},
            jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec()),
        )
        encode = jax.jit(lambda c, b: stage.to_torch_layout(encode_frozen(stage, graphdefs, c, b)))
        plan.use_cache(
            lambda batch: jax.tree.map(np.asarray, encode(frozen, jax.device_put(batch, rows))),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            barrier=lambda: multihost_utils.sync_global_devices("embeddings_cache"),
        )
        del frozen
        consts = {"model_rest": consts["model_rest"]}  # the encoders never reach the devices
    encode = None
    if plan.memo is not None:
        # Later epochs train on the encoder outputs of the first: the encoders leave the step
        # and run beside it, on the prefetch thread, for batches not kept yet.
        frozen = {k: consts[k] for k in stage.frozen}
        frozen = jax.device_put(frozen, sh.tree_shardings(mesh, frozen))
        encode = make_encoder(stage, graphdefs, mesh, frozen)
        consts = {"model_rest": consts["model_rest"]}
    encoded = plan.cache is not None or plan.memo is not None
    schedule = LRSchedule(cfg, plan.max_train_steps)
    tx = make_optimizer(cfg, plan.max_train_steps, schedule=schedule)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, cfg.use_ema), params)
    options = {
        "use_ema": cfg.use_ema,
        "encoded": encoded,
        "encoded_dtype": encoder_dtype(cfg) if encoded else None,
        "skip_nonfinite": cfg.skip_nonfinite_updates,
    }
    step = make_train_step(stage, graphdefs, mesh, abstract, consts, **options)
    consts = jax.device_put(consts, step.const_shardings)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        step.state_shardings,
    )
    inputs = abstract_inputs(
        stage,
        cfg.train_batch_size * mesh.size * plan.batch_factor,
        plan.accum,
        cfg.resolution,
        encoded,
        mesh,
        weighted=plan.batch_factor > 1,
    )
    # A fresh run's first batches, and the encoders' first compile, are made on the prefetch
    # thread while the step compiles (or its executable loads), not after it. A resumed run's
    # first update is known only once its checkpoint is read.
    source = prefetch(cfg, plan, stage, mesh, 0, encode) if plan.resume is None else None
    with contextlib.ExitStack() as on_failure:  # the batches made ahead stop if set-up fails
        if source is not None:
            on_failure.callback(source.close)
        # The state first: its init runs while the step's executable may still be loading.
        params = jax.device_put(params, step.state_shardings["params"])
        init = jax.jit(lambda p: init_state(p, tx, cfg.use_ema), out_shardings=step.state_shardings)
        state = init(params)
        del params
        try:
            hyper = step_hyperparameters(hyperparameters(cfg), schedule, 0)
            if cfg.compile_cache_dir:  # the traced step is kept beside jax's compiled programs
                args = (target, consts, hyper, *inputs)
                key = step_key(
                    stage=stage, graphdefs=graphdefs, mesh=mesh, args=args, options=options
                )
                folder = steps_folder(cfg.compile_cache_dir)
                compiled = compile_stored(step, args, folder, key, preload)
            else:
                compiled = step.compile(target, consts, hyper, inputs)
        except Exception as e:
            what = memory_failure(e)
            if what is None:
                raise
            raise out_of_memory(cfg, stage_name, what) from None
        store = CheckpointStore(cfg.output_dir, cfg.checkpoints_total_limit)
        on_failure.pop_all()
    fixed = sh.global_replicated(mesh, hyperparameters(cfg))
    run = Run(
        cfg, stage, plan, mesh, schedule, compiled, state, consts, fixed, store, encode, source
    )
    if plan.resume is not None:
        # 'latest' falls back past damaged checkpoints with a warning; an explicit one must read.
        run.state, meta = run.store.resume(cfg.resume_from_checkpoint, target, stage=stage_name)
        run.global_step = int(meta["global_step"])
        # The plan follows the checkpoint actually read ('latest' may have passed damaged ones).
        plan.resume, plan.resumed_state = run.store.path(run.global_step), meta
        run.skipped = int(meta.get("skipped_updates", 0))
        if run.main:
            print(f"resumed from {run.store.path(run.global_step)} at update {run.global_step}")
            if plan.finished:
                print(NOTHING_LEFT.format(step=run.global_step, out=run.out))
    return run


def open_tracker(cfg: TrainConfig) -> Tracker | None:
    if cfg.report_to == "none":
        return None
    tracker_cfg = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
    # accelerate's layout (the torch backend's and the reference's): one tensorboard opened on
    # logs/ shows runs of both backends side by side.
    return Tracker(
        cfg.report_to,
        location(cfg.logging_dir) / cfg.tracker_project_name,
        cfg.tracker_project_name,
        tracker_cfg,
    )


class Progress:
    """Each update's metrics, read one update late so the host never waits on the step it just
    dispatched: the non-finite check, the loss list, the progress bar and the trackers.

    Parameters:
        run: the Run; tracker: its Tracker on the main process, else None.
    """

    def __init__(self, run: Run, tracker: Tracker | None):
        self.run, self.tracker = run, tracker
        self.losses: list[float] = []
        self.done: list[float] = []  # when each update's metrics arrived (benchmarks' step times)
        self.samples = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(
            total=run.plan.max_train_steps,
            initial=run.global_step,
            desc=f"{run.stage.spec.name} (flax)",
            disable=not run.main,
        )
        self._pending = None

    def dispatched(self, update: int, metrics) -> None:
        """Update `update` (1-based) is running; the previous one's metrics are read now."""
        self.samples += self.run.plan.accum * self.run.plan.sampler.global_batch
        self.flush()
        self._pending = (update, metrics)

    def flush(self) -> None:
        if self._pending is not None:
            self._record(*self._pending)
            self._pending = None

    def _record(self, update: int, metrics) -> None:
        run = self.run
        loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if "skipped" in metrics:
            run.skipped += int(metrics["skipped"])
        elif not (np.isfinite(loss) and np.isfinite(norm)):
            what = f"loss became {loss}" if not np.isfinite(loss) else f"grad norm became {norm}"
            raise NonFiniteLoss(
                f"the {what} at optimizer update {update}; lower --learning_rate and resume from "
                f"the last checkpoint in {run.out}, or pass --skip_nonfinite_updates"
            )
        self.losses.append(loss)
        self.done.append(time.perf_counter())
        lr = run.schedule.current_lr(update)  # as torch's get_last_lr()
        if self.tracker is not None:
            self.tracker.scalars({"train_loss": loss, "lr": lr}, update)
        rate = self.samples / (time.perf_counter() - self.t0)
        self.bar.update(1)
        self.bar.set_postfix(step_loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")


def run_updates(run: Run, progress: Progress, validator: Validator) -> str | None:
    """Train from run.global_step to the plan's end, checkpointing when due; returns the name of
    the signal that stopped it early (a checkpoint is saved first), or None."""
    cfg, plan, stage = run.cfg, run.plan, run.stage
    source = run.source or prefetch(cfg, plan, stage, run.mesh, run.global_step, run.encode)
    run.source = None
    try:
        with PreemptionGuard(sigint=True) as guard:
            for update, g_batch, g_noise, g_t in source:
                hyper = run.hyper_for(update)
                run.state, metrics = run.step(run.state, run.consts, hyper, g_batch, g_noise, g_t)
                run.global_step = update + 1
                progress.dispatched(run.global_step, metrics)
                due = run.global_step % cfg.checkpointing_steps == 0
                stop = agreed(guard.requested)
                if due or run.global_step == plan.max_train_steps or stop:
                    progress.flush()
                    extra = {"skipped_updates": run.skipped} if cfg.skip_nonfinite_updates else {}
                    run.store.save(run.global_step, run.state, plan.state(run.global_step, **extra))
                if stop:  # all processes stop here, whichever of them got the signal
                    return guard.signal_name or "a signal to another process"
                # The last update is validated once, after the export, with the final weights.
                last = run.global_step == plan.max_train_steps
                micros = range(update * plan.accum, run.global_step * plan.accum)
                if not last and plan.validation_due(micros):
                    weights = run.weights()
                    if run.main:
                        validator(weights, run.global_step, progress.tracker)
            progress.flush()
    except Exception as e:
        what = memory_failure(e)
        if what is None:
            raise
        raise out_of_memory(cfg, stage.spec.name, what) from None
    finally:
        source.close()
        progress.bar.close()  # so an error line starts on a line of its own
        run.store.wait()
    return None


def finish(run: Run, progress: Progress, validator: Validator, stopped_by: str | None) -> dict:
    """Export the trained network (and validate it) or, when stopped early, say how to resume;
    returns the run's summary."""
    cfg, out = run.cfg, run.out
    summary = {"stage": run.stage.spec.name, "backend": "flax", "updates": run.global_step}
    if cfg.skip_nonfinite_updates:
        summary["skipped_updates"] = run.skipped
    if stopped_by is not None:
        if run.main:
            print(
                f"stopped by {stopped_by} after update {run.global_step}; resume with "
                "--resume_from_checkpoint latest"
            )
        summary.update(preempted=True, stopped_by=stopped_by)
        run.store.close()
        return summary
    final = run.weights()
    run.store.close()
    if run.main:
        model = run.stage.model
        nnx.update(model, final)
        try:
            run.stage.export(model, out)
        except OSError as e:  # the last checkpoint is complete: a resumed run only exports
            raise write_failed(out / "export", e, "flax", what="the final pipeline folder") from e
        if cfg.validation_prompts:
            validator(final, run.global_step, progress.tracker)
        summary.update(seconds=round(time.perf_counter() - progress.t0, 2), output_dir=str(out))
        write_summary(out, summary, progress.losses)
        summary["losses"] = progress.losses  # in-process callers (tests) get every update's loss
        summary["update_seconds"] = np.diff([progress.t0, *progress.done]).tolist()
        if cfg.push_to_hub:
            push_folder(cfg)
    return summary


def train(cfg: TrainConfig, stage_name: str, preload: StepPreload | None = None) -> dict:
    """Run a whole training job; returns a summary (losses, paths). Raises UserError early.
    `preload`: what `start.begin` returned, when the caller ran it already (before importing
    this module, so that the step's executable loads during the import)."""
    if preload is None:
        preload = begin(cfg, stage_name)
    check_shared(cfg)
    run = set_up(cfg, stage_name, preload)
    tracker = None
    try:
        if run.main:
            run.out.mkdir(parents=True, exist_ok=True)
            tracker = open_tracker(cfg)
        progress = Progress(run, tracker)
        validator = Validator(cfg, run.stage)
    except BaseException:
        if run.source is not None:  # the batches made ahead are not wanted
            run.source.close()
        if tracker is not None:
            tracker.close()
        raise
    try:
        stopped_by = run_updates(run, progress, validator)
        return finish(run, progress, validator, stopped_by)
    finally:
        if tracker is not None:  # also after a stop or a failure: the logs so far are kept
            tracker.close()
