"""Which examples each process trains on at each step: deterministic, sharded, resumable.

The order is a pure function of (seed, epoch, step), so a run resumed from a checkpoint continues
with the exact batch an uninterrupted run would have taken next (the reference restarts the epoch
instead). Every step has the same static batch shape, which jit needs: the last batch of an epoch
is completed by wrapping around to the start of that epoch's permutation, like accelerate's
even_batches, and a dataset smaller than the global batch is cycled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from kandinsky_common.errors import UserError


class EpochSampler:
    """Global batch G = per_process_batch × num_processes; process p takes slice [p·B, (p+1)·B).

    Epoch e visits `default_rng([seed, e]).permutation(n)` in order, in ceil(n / G) steps.
    """

    def __init__(
        self,
        num_examples: int,
        per_process_batch: int,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int | None = 0,
    ):
        if num_examples < 1:
            raise UserError("the training set is empty; pass a dataset with at least one example")
        if per_process_batch < 1:
            raise UserError(f"--train_batch_size {per_process_batch} must be at least 1")
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"process {process_index} of {num_processes} does not exist")
        seed = 0 if seed is None else int(seed)
        if seed < 0:
            raise UserError(f"--seed {seed} must be >= 0")
        self.num_examples = int(num_examples)
        self.per_process_batch = int(per_process_batch)
        self.num_processes = int(num_processes)
        self.process_index = int(process_index)
        self.seed = seed
        self.global_batch = self.per_process_batch * self.num_processes
        self.steps_per_epoch = math.ceil(self.num_examples / self.global_batch)
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of epoch `epoch` (int64, a permutation of range(n))."""
        if self._cached is None or self._cached[0] != epoch:
            # A per-epoch generator, not one stream advanced epoch after epoch: resuming at
            # epoch e needs no replay of epochs 0..e-1.
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)
            self._cached = (epoch, perm.astype(np.int64))
        return self._cached[1]

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """All processes' examples at (epoch, step), process 0's first: shape (G,)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} is outside epoch of {self.steps_per_epoch} steps")
        positions = (step * self.global_batch + np.arange(self.global_batch)) % self.num_examples
        return self.permutation(epoch)[positions]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """This process's `per_process_batch` examples at (epoch, step)."""
        start = self.process_index * self.per_process_batch
        return self.global_indices(epoch, step)[start : start + self.per_process_batch]

    def global_step(self, epoch: int, step: int) -> int:
        return epoch * self.steps_per_epoch + step

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, step) of the batch number `global_step`, counting from 0."""
        epoch, step = divmod(int(global_step), self.steps_per_epoch)
        return epoch, step

    def iterate(
        self, start_epoch: int = 0, start_step: int = 0, num_batches: int | None = None
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, step, indices) from the given position on; forever unless num_batches is set.

        A start_step at or past the end of an epoch rolls over into the next epoch, so
        `iterate(*position_after_last_batch)` is always valid.
        """
        current = self.global_step(start_epoch, start_step)
        produced = 0
        while num_batches is None or produced < num_batches:
            epoch, step = self.position(current)
            yield epoch, step, self.indices(epoch, step)
            current += 1
            produced += 1

    def state_dict(self, epoch: int, step: int) -> dict:
        """The position of the next batch to train on, with what it is only valid for."""
        epoch, step = self.position(self.global_step(epoch, step))
        return {
            "epoch": epoch,
            "step": step,
            "num_examples": self.num_examples,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }

    def resume_position(self, state: dict) -> tuple[int, int]:
        """(epoch, step) to pass to iterate(), after checking the checkpoint fits this run.

        The process count may change as long as the global batch stays the same: the global
        batches are then identical, only their split over processes differs.
        """
        for key, now in (
            ("num_examples", self.num_examples),
            ("global_batch", self.global_batch),
            ("seed", self.seed),
        ):
            then = state.get(key)
            if then != now:
                raise UserError(
                    f"the checkpoint's data position was saved with {key}={then}, this run has "
                    f"{now}; resume with the same dataset, --max_train_samples, global batch "
                    "(--train_batch_size × processes) and --seed, or start a new --output_dir"
                )
        return self.position(self.global_step(int(state["epoch"]), int(state["step"])))
