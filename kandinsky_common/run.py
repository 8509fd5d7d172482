"""What both backends' loops share before the first step: data, sampler, horizon, seed, resume.

`plan_run` does every check that can fail on user input (dataset, columns, checkpoint choice) and
writes nothing, so a mistake exits before output_dir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

from kandinsky_common import checkpoints as ck
from kandinsky_common.cache import (
    CaptionEntries,
    EmbeddingCache,
    fill_cache,
    fingerprint,
    folder_digest,
)
from kandinsky_common.data import check_image_files, load_train_dataset
from kandinsky_common.dreambooth import prompt_dataset
from kandinsky_common.encoded_memo import EncodedMemo
from kandinsky_common.errors import UserError
from kandinsky_common.flags import TrainConfig, script_name
from kandinsky_common.folders import write_json
from kandinsky_common.preprocess import (
    BatchBuilder,
    ImageMemo,
    caption_choice,
    load_image_processor_config,
)
from kandinsky_common.row_order import EpochSampler
from kandinsky_common.stage_spec import SPECS, StageSpec
from kandinsky_common.storage import location


@dataclass
class RunPlan:
    """What a run trains on and how long, decided once from its flags: the data and its order,
    the horizon, where it resumes, and (once `use_cache` ran) the encode-once cache."""

    cfg: TrainConfig
    spec: StageSpec
    backend: str
    dataset: object
    builder: BatchBuilder
    sampler: EpochSampler
    seed: int
    accum: int
    max_train_steps: int  # optimizer updates
    resume: Path | None
    resumed_state: dict | None
    cache: EmbeddingCache | None = None  # set by use_cache: batches are then encoder outputs
    class_builder: BatchBuilder | None = None  # DreamBooth's class images (prior preservation)
    memo: EncodedMemo | None = None  # --encoder_memory_mb: encoder outputs kept between epochs

    @property
    def batch_factor(self) -> int:
        """Examples per sampled row: 2 with prior preservation (an instance and a class image,
        so --train_batch_size 1 trains on batches of 2, as in diffusers), else 1."""
        return 1 if self.class_builder is None else 2

    def position(self, micro: int) -> tuple[int, int]:
        """(epoch, step in epoch) of micro-step `micro` (micro-batches run on across epochs)."""
        return divmod(micro, self.sampler.steps_per_epoch)

    def end_of_epoch(self, micro: int) -> bool:
        return self.position(micro)[1] == self.sampler.steps_per_epoch - 1

    def validation_due(self, micros: range) -> bool:
        """Whether an epoch whose number is a multiple of --validation_epochs ends in `micros`
        (the reference validates after epoch 0, validation_epochs, ...)."""
        cfg = self.cfg
        if not cfg.validation_prompts:
            return False
        return any(
            self.end_of_epoch(m) and self.position(m)[0] % cfg.validation_epochs == 0
            for m in micros
        )

    @property
    def finished(self) -> bool:
        """The checkpoint resumed from already holds every update: the run only exports."""
        done = self.resumed_state["global_step"] if self.resumed_state else 0
        return done >= self.max_train_steps

    def batch(self, micro: int) -> dict[str, np.ndarray]:
        """This process's numpy batch of micro-step `micro`: a pure function of the position
        (preprocessed examples, or their encoder outputs: from the cache, or kept in memory from
        an earlier epoch; `is_encoded` tells which)."""
        kept = self._recall(micro)
        if kept is not None:
            return kept
        epoch, step = self.position(micro)
        rows = self.sampler.indices(epoch, step)
        if self.cache is not None:
            counts = self.cache.caption_counts
            if counts is None:
                return self.cache.read(rows)
            # The caption the uncached run would draw for this epoch (BatchBuilder's choice).
            seed = self.builder.seed
            return self.cache.read(
                rows, [caption_choice(seed, epoch, r, counts[r]) for r in rows.tolist()]
            )
        if self.class_builder is None:
            return self.builder(rows, epoch)
        # instances first, then as many class images; per-example weights make the batch mean
        # equal instance loss + prior_loss_weight x class loss (each a mean over its half)
        instances = self.builder(rows % len(self.dataset), epoch)
        classes = self.class_builder(rows % len(self.class_builder), epoch)
        batch = {k: np.concatenate([instances[k], classes[k]]) for k in instances}
        batch["loss_weight"] = self._loss_weights(len(rows))
        return batch

    def _loss_weights(self, rows: int) -> np.ndarray:
        weight = self.cfg.prior_loss_weight
        return np.repeat(np.float32([2.0, 2.0 * weight]), rows)

    def is_encoded(self, batch: dict[str, np.ndarray]) -> bool:
        """Whether `batch` holds encoder outputs (the step skips the encoders) or their inputs."""
        return set(self.spec.encoded_keys) <= batch.keys()

    def _memo_keys(self, micro: int) -> list[tuple[str, int]]:
        """The examples of micro-step `micro`, in batch order, as the memo names them."""
        rows = self.sampler.indices(*self.position(micro)).tolist()
        if self.class_builder is None:
            return [("row", r) for r in rows]
        n, m = len(self.dataset), len(self.class_builder)
        return [("instance", r % n) for r in rows] + [("class", r % m) for r in rows]

    def _recall(self, micro: int) -> dict[str, np.ndarray] | None:
        """The encoder outputs of micro-step `micro` kept from an earlier epoch (with its
        DreamBooth loss weights), or None unless every example of it is kept."""
        if self.memo is None:
            return None
        keys = self._memo_keys(micro)
        batch = self.memo.batch(keys)
        if batch is not None and self.class_builder is not None:
            batch["loss_weight"] = self._loss_weights(len(keys) // 2)
        return batch

    def encoded_batch(
        self,
        micro: int,
        batch: dict[str, np.ndarray],
        encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """Micro-step `micro`'s `batch` (as `batch(micro)` gave it, maybe in a torch DataLoader
        worker, which cannot see this process's memo) as encoder outputs: as it is, kept from an
        earlier epoch, or encoded now by `encode` (numpy in, numpy reference layout out) and kept
        for later epochs while the budget lasts."""
        if self.is_encoded(batch):
            return batch
        kept = self._recall(micro)
        if kept is not None:
            return kept
        encoded = encode(batch)
        if self.memo is not None:
            self.memo.offer(self._memo_keys(micro), encoded)
        if "loss_weight" in batch:  # DreamBooth's per-example weights ride along
            encoded["loss_weight"] = batch["loss_weight"]
        return encoded

    def use_cache(
        self,
        encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        *,
        process_index: int,
        process_count: int,
        barrier: Callable[[], None],
    ) -> None:
        """Fill (every process its share of the blocks) and then use the encode-once cache.

        `encode` maps a preprocessed numpy batch to encoder outputs in the reference layout (a
        batch of captions alone to the stage's caption keys). A caption column of lists caches
        every caption, and each epoch reads the one the uncached run would draw. Every process
        calls it: `barrier` waits for all of them.
        """
        cfg = self.cfg
        feature = self.dataset.features.get(cfg.caption_column) if self.spec.uses_captions else None
        captions = None
        if feature is not None and not getattr(feature, "dtype", None) == "string":
            captions = CaptionEntries(
                counts=self.builder.caption_counts(),
                keys=self.spec.caption_keys,
                encode=lambda rows, choices: encode(self.builder.captions(rows, choices)),
            )
        roots = {
            "prior": cfg.pretrained_prior_model_name_or_path,
            "decoder": cfg.pretrained_decoder_model_name_or_path,
        }
        parts = {
            "stage": self.spec.name,
            "encoders": {
                f"{root}/{sub}": folder_digest(Path(roots[root]) / sub)
                for root, sub in self.spec.encoder_folders
            },
            "image_processor": self.builder_config(),
            "resolution": cfg.resolution if self.spec.uses_resolution else None,
            "data": [getattr(self.dataset, "_fingerprint", None), len(self.dataset)],
            "columns": [cfg.image_column, cfg.caption_column if self.spec.uses_captions else None],
            "precision": cfg.mixed_precision or "no",
        }
        if captions is not None:  # only then: caches of one caption per image stay current
            parts["captions"] = sha256(captions.counts.tobytes()).hexdigest()
        encoded, start = [0], time.perf_counter()
        self.cache = fill_cache(
            cfg.embeddings_cache,  # a local folder or a gs:// URL: fill_cache takes both
            fingerprint(parts),
            len(self.dataset),
            self.sampler.per_process_batch,
            # With lists, the rows' images alone: their captions are encoded one by one.
            lambda rows: encode(self.builder(rows, 0, with_captions=captions is None)),
            captions=captions,
            process_index=process_index,
            process_count=process_count,
            barrier=barrier,
            progress=lambda n: encoded.__setitem__(0, encoded[0] + n),
        )
        if encoded[0]:
            print(
                f"embeddings cache {cfg.embeddings_cache}: process {process_index} of "
                f"{process_count} encoded {encoded[0]} rows; filled in "
                f"{time.perf_counter() - start:.1f} s"
            )

    def state(self, global_step: int, **extra) -> dict:
        """training_state.json of a checkpoint taken after `global_step` updates; with the run's
        flags, so a checkpoint alone is enough to export or sample from it."""
        cfg = self.cfg
        return {
            "use_ema": cfg.use_ema,
            "config": dataclasses.asdict(cfg),
            "global_step": global_step,
            "stage": self.spec.name,
            "backend": self.backend,
            "seed": self.seed,
            "num_examples": len(self.dataset),
            "global_batch": self.sampler.global_batch,
            "gradient_accumulation_steps": self.accum,
            **extra,
        }

    def builder_config(self) -> str:
        """The preprocessing settings that shape the encoders' inputs (for the fingerprint)."""
        return repr((self.builder.clip, self.builder.resolution, self.builder.image_column))


def _prompt_dataset(cfg, folder, prompt: str, limit: int | None = None):
    """A DreamBooth folder of images as a dataset, every image captioned `prompt`, checked as
    the other sources are."""
    data = prompt_dataset(folder, prompt, cfg.image_column, cfg.caption_column, limit)
    check_image_files(data, cfg.image_column)
    return data


def _check_same_adapter(state: dict, cfg, stage: str, path) -> None:
    """A LoRA checkpoint resumes in a LoRA run of the same rank and alpha, a full fine-tune's in
    a full fine-tune: anything else would not fit (or would change the trained function)."""
    record = state.get("config", {})
    was, now = record.get("rank"), getattr(cfg, "rank", None)
    if was is None and now is None:
        return
    if was is None:
        raise UserError(
            f"{path} is a full fine-tune's checkpoint; resume it with {script_name(stage)}, or "
            "start the LoRA run in another --output_dir"
        )
    if now is None:
        raise UserError(
            f"{path} is a LoRA run's checkpoint (rank {was}); resume it with "
            f"{script_name(stage, lora=True)}, or use another --output_dir"
        )
    if was != now or record.get("lora_alpha") != cfg.lora_alpha:
        alpha = record.get("lora_alpha")
        flags = f"--rank {was}" + ("" if alpha is None else f" --lora_alpha {alpha:g}")
        raise UserError(f"{path} was trained with {flags}; resume with the same flags")


# What a resume of a finished run prints (both backends).
NOTHING_LEFT = (
    "checkpoint-{step} already holds all {step} updates of this run: nothing to train; writing "
    "the pipeline folder in {out} again (pass a larger --max_train_steps to train on)"
)


def out_of_memory(cfg: TrainConfig, stage: str, what: str) -> UserError:
    """The line for a training step that does not fit: the sizes that set its memory, the flags
    that shrink it, and what is safe."""
    pixels = SPECS[stage].uses_resolution
    size = f"--resolution {cfg.resolution}, " if pixels else ""
    fix = (
        "a smaller --resolution or --train_batch_size" if pixels else "a smaller --train_batch_size"
    )
    also = [
        flag
        for flag, unset in (
            ("--gradient_checkpointing", not cfg.gradient_checkpointing),
            ("--mixed_precision bf16", cfg.mixed_precision in (None, "no")),
        )
        if unset
    ]
    if also:
        fix += f" ({' and '.join(also)} lower it too)"
    return UserError(
        f"the {stage} training step ran out of {what} ({size}--train_batch_size "
        f"{cfg.train_batch_size} per device); try {fix}; the complete checkpoints in "
        f"{cfg.output_dir} are kept (--resume_from_checkpoint latest)"
    )


def validation_out_of_memory(cfg: TrainConfig, stage: str, what: str) -> str:
    """The warning for validation images that do not fit in memory (the training step did):
    training goes on without them, and what to pass to have them."""
    n, size = len(cfg.validation_prompts), cfg.resolution
    fixes = ["fewer --validation_prompts (they render as one batch)"] if n > 1 else []
    if not SPECS[stage].uses_resolution:  # the prior trains without it
        fixes.append(f"a smaller --resolution (the prior trains without it; it is {size})")
    fixes.append(
        "no --validation_prompts and render a checkpoint or the export afterwards with "
        "scripts/generate.py --size N"
    )
    return (
        f"warning: rendering {n} validation image(s) at {size}x{size} px ran out of {what}; "
        f"training goes on without validation images. To have them, pass {', or '.join(fixes)}"
    )


def write_summary(out: Path, summary: dict, losses: list[float]) -> None:
    """train_summary.json, with the first and last loss of this invocation's updates. A resume
    that had nothing left to train keeps the losses the file already records."""
    path = location(out) / "train_summary.json"
    if losses:
        summary.update(loss_first=losses[0], loss_last=losses[-1])
    else:
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = {}
        summary.update(loss_first=before.get("loss_first"), loss_last=before.get("loss_last"))
    write_json(path, summary)


def plan_run(
    cfg: TrainConfig,
    spec: StageSpec,
    backend: str,
    *,
    tokenizer,
    prior_folder: Path,
    num_processes: int,
    process_index: int,
    per_process_batch: int | None = None,
    builder_threads: int = 1,
    memo_copies: int = 1,
    resumed_state: dict | None = None,
) -> RunPlan:
    """per_process_batch: examples per process and micro-step (default: --train_batch_size, the
    torch backend's one device per process; the flax backend passes batch x local devices)."""
    if cfg.instance_data_dir is not None:
        dataset = _prompt_dataset(cfg, cfg.instance_data_dir, cfg.instance_prompt)
    else:
        dataset = load_train_dataset(
            dataset_name=cfg.dataset_name,
            dataset_config_name=cfg.dataset_config_name,
            train_data_dir=cfg.train_data_dir,
            cache_dir=cfg.cache_dir,
            image_column=cfg.image_column,
            caption_column=cfg.caption_column if spec.uses_captions else None,
            max_train_samples=cfg.max_train_samples,
            seed=cfg.seed if cfg.seed is not None else 0,
        )
    class_dataset = None
    if cfg.with_prior_preservation:
        class_dataset = _prompt_dataset(
            cfg, cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images
        )
    ck.check_no_foreign_checkpoints(cfg.output_dir, backend)
    resume = ck.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, backend=backend)
    if resume is not None and resumed_state is None and cfg.resume_from_checkpoint == "latest":
        # Checks below need a readable state: a damaged newest one is passed over (the backend's
        # restore warns when it falls back past it); if none reads, read_state names the damage.
        found = ck.newest_readable(cfg.output_dir, backend)
        if found is not None:
            resume, resumed_state = found
    if resumed_state is None and resume is not None:
        resumed_state = ck.read_state(resume)
    if resumed_state:
        ck.check_compatible(resumed_state, stage=spec.name, backend=backend, path=resume)
        _check_same_adapter(resumed_state, cfg, spec.name, resume)
        if resumed_state.get("use_ema", cfg.use_ema) != cfg.use_ema:
            raise UserError(
                f"{resume} was saved with use_ema={not cfg.use_ema}; pass the same --use_ema"
            )
        if resumed_state.get("num_examples", len(dataset)) != len(dataset):
            raise UserError(
                f"{resume} was trained on {resumed_state['num_examples']} examples, the data now "
                f"has {len(dataset)}; resume with the same data or start a new --output_dir"
            )
    seed = cfg.seed
    if seed is None:  # still one recorded stream, so a resumed run continues it exactly
        fresh = int(np.random.SeedSequence().entropy % 2**31)
        seed = resumed_state["seed"] if resumed_state else fresh

    # The decoded images are kept for later epochs, except where the embeddings cache replaces
    # them; each of `memo_copies` (torch's DataLoader workers) keeps its own share of the budget.
    memo = None
    if cfg.image_memory_mb and not cfg.embeddings_cache:
        memo = ImageMemo(cfg.image_memory_mb * 2**20 // max(1, memo_copies))

    def builder_of(data) -> BatchBuilder:
        return BatchBuilder(
            data,
            image_column=cfg.image_column,
            caption_column=cfg.caption_column if spec.uses_captions else None,
            tokenizer=tokenizer if spec.uses_captions else None,
            resolution=cfg.resolution if spec.uses_resolution else None,
            image_processor_config=load_image_processor_config(prior_folder),
            seed=seed,
            num_threads=builder_threads,
            memo=memo,
        )

    builder = builder_of(dataset)
    class_builder = None if class_dataset is None else builder_of(class_dataset)
    encoded_memo = None
    if _keeps_encoder_outputs(cfg, spec, dataset, num_processes):
        encoded_memo = EncodedMemo(cfg.encoder_memory_mb * 2**20)
    # DreamBooth pairs row r with instance r mod n and class image r mod m (diffusers' length)
    rows = len(dataset) if class_dataset is None else max(len(dataset), len(class_dataset))
    sampler = EpochSampler(
        rows,
        per_process_batch or cfg.train_batch_size,
        num_processes=num_processes,
        process_index=process_index,
        seed=seed,
    )
    accum = cfg.gradient_accumulation_steps
    updates_per_epoch = math.ceil(sampler.steps_per_epoch / accum)
    max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    done = int(resumed_state["global_step"]) if resumed_state else 0
    if done > max_train_steps:
        flag = (
            f"--max_train_steps {max_train_steps}"
            if cfg.max_train_steps
            else f"--num_train_epochs {cfg.num_train_epochs} ({max_train_steps} updates)"
        )
        raise UserError(
            f"{resume} has {done} updates, more than {flag}: there is nothing to train; pass "
            f"--max_train_steps above {done} to train on, or export it with `python "
            f"scripts/export_checkpoint.py --checkpoint {resume} --output DIR`"
        )
    return RunPlan(
        cfg=cfg,
        spec=spec,
        backend=backend,
        dataset=dataset,
        builder=builder,
        sampler=sampler,
        seed=seed,
        accum=accum,
        max_train_steps=max_train_steps,
        resume=resume,
        resumed_state=resumed_state,
        class_builder=class_builder,
        memo=encoded_memo,
    )


def _keeps_encoder_outputs(cfg: TrainConfig, spec: StageSpec, dataset, num_processes: int) -> bool:
    """Whether a run keeps its encoder outputs between epochs (`--encoder_memory_mb`): not with
    the embeddings cache (which holds them already), not over several processes (each process
    draws other rows every epoch, so its memo would hardly ever hold a whole batch), and not with
    several captions per image (each epoch draws another caption, so other text outputs)."""
    if not cfg.encoder_memory_mb or cfg.embeddings_cache or num_processes > 1:
        return False
    if spec.uses_captions:
        feature = dataset.features.get(cfg.caption_column)
        return getattr(feature, "dtype", None) == "string"
    return True
