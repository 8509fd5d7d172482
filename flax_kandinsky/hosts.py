"""The hosts of one run: joining the distributed runtime, agreeing, and sharing storage.

A TPU pod of v3-32 or more is several VMs, each with its own local disk. A checkpoint that
process 0 finds in a local `--output_dir` holds only process 0's shards, so a pod's outputs must
live where every host sees the same files (a `gs://` bucket, or a filesystem all hosts mount).
`check_shared` finds out before any work, with a marker file that process 0 writes.
"""

from __future__ import annotations

import os
import secrets

import jax
import numpy as np
from jax.experimental import multihost_utils

from kandinsky_common.errors import UserError
from kandinsky_common.storage import is_url, location

MARKER = ".kandinsky-hosts-{token}"


def init_distributed(cfg) -> None:
    """Multi-host: explicit flags, or a TPU pod's own environment. Single host: nothing."""
    if cfg.coordinator_address or cfg.num_processes:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def agreed(flag: bool) -> bool:
    """True on every process if it is True on any (a SIGTERM reaches a pod's hosts at slightly
    different times; a failed check on one host must stop all of them)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def _blind_processes(folder: str, flag: str) -> list[int]:
    """Processes that cannot see the marker process 0 writes in `folder` (all processes call)."""
    # one token for all: a marker left on a host's own disk by another run does not count
    token = int(multihost_utils.broadcast_one_to_all(np.int64(secrets.randbits(62))))
    root = location(folder)
    marker = root / MARKER.format(token=token)
    created = not is_url(folder) and not root.exists()
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(token))
    # named by the flag: each host's path may read differently (a `~` of its own)
    multihost_utils.sync_global_devices(f"shared storage check {flag}")
    try:
        seen = marker.read_text() == str(token)
    except OSError:
        seen = False
    flags = multihost_utils.process_allgather(np.array([seen]))
    multihost_utils.sync_global_devices(f"shared storage check done {flag}")
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
        if created and not any(root.iterdir()):
            root.rmdir()  # a run that then fails on a flag leaves nothing behind
    return [int(p) for p in np.flatnonzero(~np.asarray(flags).reshape(-1))]


def check_shared(cfg) -> None:
    """With several processes, every one of them must see the same output_dir and embeddings
    cache: else a UserError on every process, before anything is trained or encoded."""
    if jax.process_count() == 1:
        return
    for flag, folder in (
        ("--output_dir", cfg.output_dir),
        ("--embeddings_cache", cfg.embeddings_cache),
    ):
        if not folder:
            continue
        blind = _blind_processes(folder, flag)
        if blind:
            which = ", ".join(map(str, blind))
            raise UserError(
                f"{flag} {folder} is not shared by the hosts of this run: process(es) {which} "
                "cannot see the file process 0 wrote there, so no host would hold a whole "
                f"checkpoint; pass a bucket ({flag} gs://BUCKET/...) or a folder every host mounts"
            )
