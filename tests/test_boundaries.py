"""Import boundaries (docs/architecture.md, "Packages and import boundaries"): flax never imports
torch, torch never imports jax, common imports neither, and no product package imports the test
fixtures; checked on every import statement, lazy
ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "flax_kandinsky": {
        "torch",
        "torchvision",
        "accelerate",
        "diffusers",
        "torch_kandinsky",
        "kandinsky_fixtures",
    },
    "torch_kandinsky": {"jax", "jaxlib", "flax", "optax", "orbax", "flax_kandinsky"}
    | {"kandinsky_fixtures"},
    "kandinsky_common": {
        "torch",
        "accelerate",
        "diffusers",
        "jax",
        "flax",
        "optax",
        "orbax",
        "torch_kandinsky",
        "flax_kandinsky",
        "kandinsky_fixtures",
    },
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_its_boundary(package):
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(p)
        if name in FORBIDDEN[package]
    ]
    assert not bad, bad
