"""--push_to_hub: fail fast when the hub is unreachable, upload the output folder at the end."""

from __future__ import annotations

import os
from pathlib import Path

from kandinsky_common.errors import UserError


def _repo_id(cfg) -> str:
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


def check_hub(cfg) -> None:
    """Create the repo up front (as the reference), turning any failure into one clear line."""
    from huggingface_hub import constants, create_repo

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            "--push_to_hub needs the Hugging Face hub, but HF_HUB_OFFLINE is set; drop the flag "
            "and upload output_dir later with `hf upload`"
        )
    try:
        create_repo(_repo_id(cfg), exist_ok=True, token=cfg.hub_token)
    except Exception as e:  # network, auth and permission errors all end the same way
        raise UserError(
            f"--push_to_hub: the hub is unreachable or refused the repo {_repo_id(cfg)!r} "
            f"({type(e).__name__}); check `hf auth login` and the network, or drop the flag"
        ) from e


def push_folder(cfg) -> None:
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=_repo_id(cfg),
        folder_path=cfg.output_dir,
        commit_message="End of training",
        ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*"],
        token=cfg.hub_token,
    )
