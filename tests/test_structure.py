"""The layering docs/architecture.md describes, checked on the source: no import circle among
the product packages, and no code outside the stages (and the CLI that names them) that asks
which stage it is running."""

from __future__ import annotations

import ast
import re

from tests.helpers import ROOT

PACKAGES = ("kandinsky_common", "flax_kandinsky", "torch_kandinsky")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the product modules it imports, at the top or inside a function (a lazy import
    is still a dependency: it runs the first time the function is called)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, tree in modules.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {m for m in map(resolve, targets) if m and m != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_among_the_product_packages():
    graph = import_graph()
    assert graph["flax_kandinsky.export"], "the graph found no imports at all"
    assert cycles(graph) == []


def test_sampling_and_export_do_not_need_the_training_loop():
    graph = import_graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    starts = ("flax_kandinsky.sampling", "torch_kandinsky.sampling")
    for start in (*starts, "flax_kandinsky.export", "torch_kandinsky.export"):
        loops = {m for m in reach(start) if m.endswith("training.loop")}
        assert not loops, f"{start} reaches {loops}"
    for start in starts:
        assert not {m for m in reach(start) if ".training" in m}, start


STAGE_NAME = re.compile(
    r"""(==|!=|\bin\b)\s*\(?["'](prior|decoder)["']|["'](prior|decoder)["']\s*(==|!=)"""
)


def test_no_code_outside_the_stages_asks_which_stage_it_runs():
    allowed = {"flax_kandinsky/stages.py", "torch_kandinsky/stages.py", "kandinsky_common/cli.py"}
    found = []
    for pkg in (*PACKAGES, "scripts", "bench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in allowed:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if STAGE_NAME.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert found == []
