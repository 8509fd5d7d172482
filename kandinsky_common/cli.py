"""Entry point shared by the two training scripts: parse, dispatch on --backend, report.

The backend's loop is imported only after the flags are valid, so `--help` and flag mistakes cost
no framework import, and a torch-only or jax-only install runs its own backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from kandinsky_common.errors import INTERRUPTED, UserError, run_cli
from kandinsky_common.flags import parse_config
from kandinsky_common.preemption import sigint_deferred


def _loop_train(backend: str) -> Callable:
    """`train` of the backend's loop. Ctrl-C during the import waits for its end: jaxlib's
    initialisation crashes (SIGSEGV) when interrupted."""
    try:
        with sigint_deferred():
            if backend == "flax":
                from flax_kandinsky.training.loop import train
            else:
                from torch_kandinsky.training.loop import train
    except ModuleNotFoundError as e:
        raise UserError(f"--backend {backend} needs {e.name}: `pip install -e .[{backend}]`") from e
    return train


def backend_train(backend: str) -> Callable:
    """`train(cfg, stage)` of the backend. The flax one configures jax and begins loading the
    step's executable (`flax_kandinsky.training.start`) before it imports the rest of its loop,
    so that the load and the imports overlap."""
    if backend != "flax":
        return _loop_train(backend)
    try:
        with sigint_deferred():
            from flax_kandinsky.training.start import begin
    except ModuleNotFoundError as e:
        raise UserError(f"--backend flax needs {e.name}: `pip install -e .[flax]`") from e

    def train(cfg, stage: str) -> dict:
        preload = begin(cfg, stage)
        return _loop_train("flax")(cfg, stage, preload)

    return train


def main(stage: str, argv: list[str] | None = None, lora: bool = False) -> int:
    """Run the training script of `stage` (its LoRA script with `lora`)."""

    def _main(args):
        cfg = parse_config(args, stage, lora)
        summary = backend_train(cfg.backend)(cfg, stage)
        if summary.get("output_dir"):
            shown = {k: v for k, v in summary.items() if k not in ("losses", "update_seconds")}
            print(json.dumps(shown))
        # A first Ctrl-C saves a checkpoint and stops cleanly; the shell still learns that the
        # user interrupted the command (SIGTERM, a preemption, exits 0 for the scheduler).
        return INTERRUPTED if summary.get("stopped_by") == "SIGINT" else 0

    return run_cli(
        _main,
        argv,
        interrupted="stopped at once, without a checkpoint of the running update; the complete "
        "checkpoints in --output_dir are kept: rerun with --resume_from_checkpoint latest",
    )
