"""README.md stays true: the two set-up commands exist and every flag is documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kandinsky_common.flags import TrainConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_flag_is_in_the_flag_table():
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name}`" not in README]
    assert not missing


def test_the_two_setup_commands_come_first():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    root = Path(__file__).resolve().parents[1]
    assert (root / "scripts/demo.sh").is_file() and (root / "scripts/test.sh").is_file()
    assert "scripts/test.sh" in (root / ".ci/run").read_text()
