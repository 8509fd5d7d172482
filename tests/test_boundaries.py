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


# The one place common names a backend: the CLI imports the chosen backend's loop, lazily, once
# the flags are valid, and for flax first the light module that begins loading the step
# (kandinsky_common/cli.py, backend_train).
DISPATCH = {("kandinsky_common/cli.py", m) for m in ("flax_kandinsky", "torch_kandinsky")}
DISPATCHED = {
    "flax_kandinsky.training.loop",
    "flax_kandinsky.training.start",
    "torch_kandinsky.training.loop",
}


def _imports(path: Path):
    rel = str(path.relative_to(ROOT))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if (rel, top) in DISPATCH and node.module in DISPATCHED:
                continue
            yield top


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_its_boundary(package):
    bad = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(p)
        if name in FORBIDDEN[package]
    ]
    assert not bad, bad
