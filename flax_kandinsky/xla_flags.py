"""XLA flags the flax code sets for itself, in a module light enough to import before the
networks (a flax run sets them before jax starts its backend)."""

from __future__ import annotations

import os

# XLA:CPU's default scheduler orders independent ops for concurrency: it started every block of a
# chunked attention before finishing any (the tiny MoVQ at 512 px, 65536 tokens: 34 GB live instead
# of 0.4 GB). Its memory-minimising scheduler keeps about one block live. XLA:CPU reads this flag
# from XLA_FLAGS only (a jit's compiler_options leave it unchanged); other backends ignore it.
CPU_LOW_MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_cpu_low_memory_schedule() -> None:
    """Add CPU_LOW_MEMORY_SCHEDULE to XLA_FLAGS unless they choose a scheduler already. Takes
    effect only if called before jax's first computation in the process."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_LOW_MEMORY_SCHEDULE.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_LOW_MEMORY_SCHEDULE}".strip()
