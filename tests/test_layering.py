"""Design rules: ops, moe, models, tasks and data never import torch.distributed (parallelism comes from
outside); every part imports only lower levels; no module imports itself in a cycle."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import evomoe

PKG = Path(evomoe.__file__).parent
LAYERS = ("ops", "moe", "models", "tasks", "data")


def source_files(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


def package_of(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1]  # a module's package; for __init__.py, the package it defines
    return ".".join(parts)


def imported_modules(path: Path, package: str) -> list[str]:
    """Absolute names of every module imported anywhere in the file (also inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else (node.module or "")
            )
            names += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names += [
                a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
    return names


def distributed_uses(path: Path, package: str) -> list[str]:
    """Imports of torch.distributed, and ``torch.distributed`` attribute chains."""
    uses = [
        m
        for m in imported_modules(path, package)
        if m == "torch.distributed" or m.startswith("torch.distributed.")
    ]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr == "distributed":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                uses.append(f"torch.distributed (line {node.lineno})")
    return uses


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_never_imports_torch_distributed(layer):
    files = source_files(layer)
    assert files, f"no source files under evomoe/{layer}"
    bad = {str(f.relative_to(PKG)): distributed_uses(f, package_of(f)) for f in files}
    assert not {k: v for k, v in bad.items() if v}


# Every top-level part of the package, by level: a part may import its own modules and parts of lower
# levels only (design.md: cli -> compare/sweep -> train -> parallel -> tasks -> models -> moe -> ops; all
# may use config, registry, schedule, errors). The registry discovers plug-in packages by name at run time,
# like entry points (``registry.PLUGIN_PACKAGES``), so it imports none of them.
LEVELS = {
    "errors": 0,
    "registry": 0,
    "config": 1,
    "schedule": 1,
    "ops": 2,
    "moe": 3,
    "data": 3,
    "models": 4,
    "evolve": 4,
    "tasks": 5,
    "generate": 5,
    "parallel": 6,
    "train": 7,
    "compare_report": 7.5,
    "compare": 8,
    "crossover": 8.5,
    "verdict": 1,
    "sweep": 9,
    "cli": 10,
    "__main__": 11,
}


def module_files() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1]) if rel.name == "__init__" else ".".join(rel.parts)
        out[name] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """evomoe module -> the evomoe modules it imports (anywhere in the file). ``from pkg import sub`` counts
    as importing ``pkg.sub``; a module's own parent packages are left out (Python runs them first anyway)."""
    files = module_files()
    graph = {}
    for name, f in files.items():
        deps = set()
        for m in imported_modules(f, package_of(f)):
            while m and m not in files:
                m = m.rpartition(".")[0]
            if m and m != name and not name.startswith(m + ".") and m.startswith("evomoe"):
                deps.add(m)
        # "from . import x" also lists the package itself: drop it when a submodule of it is listed
        graph[name] = {d for d in deps if not any(e.startswith(d + ".") for e in deps)}
    return graph


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v) :] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if not state.get(u):
            visit(u)
    return cycles


def test_every_part_has_a_level():
    parts = {part(m) for m in module_files() if m != "evomoe"}
    assert parts == set(LEVELS), f"parts without a level (or levels without a part): {parts ^ set(LEVELS)}"


def test_no_part_imports_a_higher_or_equal_level():
    bad = [
        f"{a} -> {b}"
        for a, deps in import_graph().items()
        for b in deps
        if a != "evomoe" and part(a) != part(b) and LEVELS[part(b)] >= LEVELS[part(a)]
    ]
    assert not bad, bad


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_checker_catches_violations(tmp_path):
    src = tmp_path / "bad.py"
    src.write_text(
        "import torch.distributed as dist\nfrom torch import distributed\nfrom torch.distributed import nn\n"
        "def f():\n    import torch\n    return torch.distributed.get_rank()\n"
    )
    uses = distributed_uses(src, "evomoe.moe")
    assert "torch.distributed.nn" in uses and "torch.distributed (line 6)" in uses and len(uses) == 5
    rel = tmp_path / "rel.py"
    rel.write_text("from ..train import optim\nfrom .router import Router\n")
    assert "evomoe.train.optim" in imported_modules(rel, "evomoe.moe")
    assert "evomoe.moe.router" in imported_modules(rel, "evomoe.moe")


def test_package_of():
    assert package_of(PKG / "moe" / "routers" / "dts.py") == "evomoe.moe.routers"
    assert package_of(PKG / "moe" / "__init__.py") == "evomoe.moe"
