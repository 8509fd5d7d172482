"""Shared helpers for end-to-end tests: running the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def script_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    return env


def run_script(
    name: str, *args, check=True, timeout=600, cwd=ROOT, env=None
) -> subprocess.CompletedProcess:
    """Run scripts/<name> with this interpreter, as a user would: from `cwd` (where relative
    paths in `args` are taken from)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=env or script_env(),
        cwd=cwd,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def train_args(prior_dir, decoder_dir, data_dir, out_dir, **flags) -> list[str]:
    """Flags of a small tiny-model run; keyword flags override or add (True = bare flag)."""
    base = {
        "pretrained_prior_model_name_or_path": prior_dir,
        "pretrained_decoder_model_name_or_path": decoder_dir,
        "train_data_dir": data_dir,
        "output_dir": out_dir,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "resolution": 64,
        "report_to": "tensorboard",
    }
    base.update(flags)
    args = []
    for k, v in base.items():
        if v is None or v is False:
            continue
        args.append(f"--{k}")
        if v is not True:
            args.extend(v if isinstance(v, list | tuple) else [str(v)])
    return args
