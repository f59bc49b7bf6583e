"""Small generated corpora for the data tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from data_corpus_gen import code_text


@pytest.fixture
def make_corpus(tmp_path: Path) -> Callable[..., Path]:
    """``make_corpus(n_files, n_lines, name)`` writes ``n_files`` .py files (seeded) and returns the dir."""

    def make(n_files: int = 12, n_lines: int = 60, name: str = "corpus", seed: int = 0) -> Path:
        rng = random.Random(seed)
        root = tmp_path / name
        for i in range(n_files):
            sub = root / ("pkg" if i % 3 == 0 else "") / f"mod_{i:03d}.py"
            sub.parent.mkdir(parents=True, exist_ok=True)
            sub.write_text(code_text(rng, n_lines), encoding="utf-8")
        return root

    return make
