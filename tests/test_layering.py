"""Design rule: ops, moe and models never import torch.distributed (parallelism comes from outside)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import evomoe

PKG = Path(evomoe.__file__).parent
LAYERS = ("ops", "moe", "models")
# dependency direction: cli -> train -> parallel -> models -> moe -> ops
UPPER = {
    "ops": ("moe", "models", "parallel", "train", "cli"),
    "moe": ("models", "parallel", "train", "cli"),
    "models": ("parallel", "train", "cli"),
}


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


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_does_not_import_upper_layers(layer):
    forbidden = tuple(f"evomoe.{name}" for name in UPPER[layer])
    bad = [
        f"{f.relative_to(PKG)}: {m}"
        for f in source_files(layer)
        for m in imported_modules(f, package_of(f))
        if m in forbidden or m.startswith(tuple(p + "." for p in forbidden))
    ]
    assert not bad, bad


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
