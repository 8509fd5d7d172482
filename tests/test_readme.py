"""README.md and the docs it points to stay true: the two set-up commands come first, every flag
is in docs/flags.md, and every link leads to a file in the repository."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kandinsky_common.flags import LoraTrainConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_flag_is_in_the_flag_table():
    flags = (ROOT / "docs" / "flags.md").read_text()
    names = {f.name for c in (TrainConfig, LoraTrainConfig) for f in dataclasses.fields(c)}
    missing = [n for n in sorted(names) if f"`--{n}`" not in flags]
    assert not missing


def test_the_two_setup_commands_come_first():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    root = Path(__file__).resolve().parents[1]
    assert (root / "scripts/demo.sh").is_file() and (root / "scripts/test.sh").is_file()
    assert "scripts/test.sh" in (root / ".ci/run").read_text()


# Split so that this file does not match itself. A fresh clone holds nothing beside the
# repository, so a pointer to a sibling folder or to the machine it was written on is dead.
_OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "/" + "work/", "(" + "spec ", ", " + "spec ")
_TEXT_SUFFIXES = (".py", ".md", ".sh", ".toml")


def _repository_text_files() -> list[Path]:
    import subprocess

    import pytest

    root = Path(__file__).resolve().parents[1]
    try:
        listing = subprocess.run(
            # Untracked files too, so a new file is checked before it is committed.
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = (root / name for name in listing.splitlines() if name.endswith(_TEXT_SUFFIXES))
    return [p for p in paths if p.is_file()]


def test_no_file_points_outside_the_repository():
    root = Path(__file__).resolve().parents[1]
    bad = [
        f"{p.relative_to(root)}:{n}: {line.strip()}"
        for p in _repository_text_files()
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if any(s in line for s in _OUTSIDE)
    ]
    assert not bad, bad


def test_markdown_links_point_to_files_in_the_repository():
    import re

    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "architecture.md").is_file()
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    docs += [root / "bench" / "README.md", root / "plans" / "README.md"]
    bad = []
    for doc in docs:
        text = doc.read_text()
        links = re.findall(r"\]\(([^)\s]+)\)", text)
        # A path in backticks that climbs out of the folder is a link in all but syntax.
        links += re.findall(r"`(\.\./[^`\s]*)`", text)
        for link in links:
            if "://" in link or link.startswith(("#", "mailto:")):
                continue
            target = (doc.parent / link.split("#")[0]).resolve()
            if not target.is_relative_to(root) or not target.exists():
                bad.append(f"{doc.relative_to(root)}: {link}")
    assert not bad, bad
