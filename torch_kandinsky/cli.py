"""Entry point shared by the two training scripts: parse, dispatch on --backend, report."""

from __future__ import annotations

import json

from kandinsky_common.errors import run_cli
from kandinsky_common.flags import parse_config


def main(stage: str, argv: list[str] | None = None) -> int:
    def _main(args):
        cfg = parse_config(args, stage)
        if cfg.backend == "torch":
            from torch_kandinsky.training.loop import train
        summary = train(cfg, stage)
        if summary.get("output_dir"):
            print(json.dumps(summary))
        return 0

    return run_cli(_main, argv)
