"""Session-wide fixtures for the training, CLI and reliability tests.

``evomoe_cache``: one token cache for the whole session (built once by the first run that needs it).
``tiny_args``: the tiny preset shortened so that a full run (all three phases) takes a few seconds on a
2-core CPU; ``tiny_run``: one finished run with those arguments, made by ``python -m evomoe`` in a
subprocess. Tests that change a run work on a copy (``copy_run``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# diversify [0, 10) -> sparsify [10, 30) -> sparse [30, 40); one metrics row per step (per-step losses),
# a validation pass every 10 steps, a checkpoint every 3 (not aligned with the phases on purpose).
# One thread: on a shared 2-core machine more threads make the tiny model ~20x slower.
TINY_ARGS = [
    "tiny",
    "--no-progress",
    "--train.steps=40",
    "--evolve.diversify_steps=10",
    "--gate.decay_steps=10",
    "--gate.hard_after=20",
    "--train.threads=1",
    "--train.log_every=1",
    "--train.eval_every=10",
    "--train.ckpt_every=3",
]


@pytest.fixture(scope="session")
def evomoe_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evomoe_cache")


@pytest.fixture(scope="session")
def cli_env(evomoe_cache) -> dict[str, str]:
    """The environment for ``python -m evomoe`` subprocesses."""
    env = dict(os.environ)
    env["EVOMOE_CACHE"] = str(evomoe_cache)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.pop("WORLD_SIZE", None)  # never look like a torchrun launch
    return env


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    return list(TINY_ARGS)


def evomoe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomoe", *args]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cli_env) -> Path:
    """A finished tiny run (uninterrupted): the reference for the resume tests. Do not modify it."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    proc = subprocess.run(
        evomoe_cmd("train", *TINY_ARGS, "--out", str(out)),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "stdout.txt").write_text(proc.stdout)
    (out.parent / "stderr.txt").write_text(proc.stderr)
    return out


@pytest.fixture
def copy_run(tmp_path, tiny_run):
    """``copy_run(name)``: a private copy of the finished tiny run."""

    def make(name: str = "run") -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_run, dst)
        return dst

    return make


@pytest.fixture
def cli(monkeypatch, capsys, evomoe_cache):
    """``cli(*argv) -> (rc, stdout, stderr)``: ``evomoe.cli.main`` in this process (no start-up cost)."""
    from evomoe.cli import main

    monkeypatch.setenv("EVOMOE_CACHE", str(evomoe_cache))
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except Exception:  # what the interpreter does with an uncaught exception: traceback, status 1
            traceback.print_exc()
            rc = 1
        out, err = capsys.readouterr()
        return rc, out, err

    return run
