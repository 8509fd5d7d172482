"""Per-micro-step noise and timesteps, drawn in numpy from (seed, micro step, process).

Both backends draw from this one stream, so a resumed run needs no saved RNG state (the stream is a
function of the position) and the torch and flax backends train on identical noise and timesteps.
"""

from __future__ import annotations

import numpy as np


def draw(
    seed: int, micro_step: int, process_index: int, shape: tuple[int, ...], num_timesteps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(noise float32 of `shape`, timesteps int64 of shape (shape[0],)), uniform in [0, T)."""
    rng = np.random.default_rng([seed, micro_step, process_index])
    timesteps = rng.integers(0, num_timesteps, size=(shape[0],), dtype=np.int64)
    noise = rng.standard_normal(shape, dtype=np.float32)
    return noise, timesteps
