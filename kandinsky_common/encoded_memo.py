"""Frozen-encoder outputs kept in host memory from one epoch to the next (framework-free).

The frozen encoders (CLIP text and image, MoVQ) see the same inputs in every epoch: the
preprocessing is deterministic and the reference draws no augmentation. Their outputs for an
example are therefore the same in every epoch, and a later epoch can train on the outputs the
first one computed instead of running the encoders again. This is the in-memory, per-run sibling
of the `--embeddings_cache` folder; it needs no flag beyond its budget (`--encoder_memory_mb`).

A micro-batch trains on kept outputs only when every one of its examples is kept (a batch of
another shape would compile another program); otherwise it is encoded whole and its new
examples are kept while the budget lasts (no eviction: in a shuffled order each evicted example
would be needed again before the one kept in its place).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

import numpy as np


class EncodedMemo:
    """Per-example encoder outputs (reference layout, numpy) under a byte budget. Thread-safe:
    the flax loop fills it from its prefetch thread.

    Parameters:
        max_bytes: the budget for all outputs kept; 0 keeps none.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.used = 0
        self._rows: dict[Hashable, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def batch(self, keys: Sequence[Hashable]) -> dict[str, np.ndarray] | None:
        """The stacked outputs of `keys`, in their order, or None unless every one is kept."""
        rows = [self._rows.get(k) for k in keys]
        if not rows or any(r is None for r in rows):
            return None
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}

    def offer(self, keys: Sequence[Hashable], outputs: dict[str, np.ndarray]) -> None:
        """Keep example i's slice of every array of `outputs` under keys[i], while room lasts."""
        for i, key in enumerate(keys):
            if key in self._rows:
                continue
            # A copy: a view would hold the whole batch's array alive and the budget would lie.
            row = {name: np.array(v[i]) for name, v in outputs.items()}
            size = sum(a.nbytes for a in row.values())
            with self._lock:
                if key in self._rows or self.used + size > self.max_bytes:
                    continue
                self._rows[key] = row
                self.used += size

    def __getstate__(self) -> dict:
        # A torch DataLoader worker gets its own empty memo: only the main process fills it.
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])
