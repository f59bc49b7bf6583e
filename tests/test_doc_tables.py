"""The documented tiny-budget rows come back from their command: ``benchmarks/tiny_tables.py`` re-runs the
Switch row of the tiny-mlm table (docs/results.md section 4, ~20 s) and compares it with the docs; the same
run against a copy of the docs with one value changed must fail. The whole check (every row of both tables,
~12 min) is ``make tiny-tables``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tiny_tables.py"


def tables(out: Path, docs: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--tables", "tiny-mlm", "--methods", "switch", "--out", str(out)]
    return subprocess.run([*cmd, "--docs", str(docs)], capture_output=True, text=True, timeout=600)


def test_the_documented_switch_row_of_the_tiny_mlm_table_is_what_the_code_produces(tmp_path):
    done = tables(tmp_path / "runs", ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the documented tiny-budget rows match the runs" in done.stdout

    # a stale value in a copy of the docs: the same (reused) run now reports it and fails
    docs = tmp_path / "docs_copy"
    (docs / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", docs / "README.md")
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    start = text.index("<!-- tiny-mlm table")
    row = text.index("| switch |", start)
    cells = text[row : text.index("\n", row)].split(" | ")
    stale = " | ".join([*cells[:2], "9.9999", *cells[3:]])
    (docs / "docs" / "results.md").write_text(text.replace(text[row : text.index("\n", row)], stale, 1))
    bad = tables(tmp_path / "runs", docs)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "STALE: tiny-mlm switch masked-token val loss: docs 9.9999" in bad.stdout

    # the README's masked-LM list is checked too
    (docs / "docs" / "results.md").write_text(text)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (docs / "README.md").write_text(readme.replace("switch 3.230", "switch 3.231", 1))
    bad = tables(tmp_path / "runs", docs)
    assert bad.returncode == 1 and "STALE: README.md tiny-mlm switch: 3.231" in bad.stdout, bad.stdout[-3000:]
