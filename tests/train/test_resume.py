"""Exact resume: a run interrupted at random steps (SIGKILL, SIGTERM, SIGINT), across the spawn, the
temperature decay and the soft -> hard switch, then resumed, logs bitwise the same per-step losses and
ends with bitwise the same weights as the uninterrupted ``tiny_run``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from short_run import short_overrides

from evomoe.config import load_config
from evomoe.train.metrics import IntervalStats, read_jsonl
from evomoe.train.trainer import Trainer

# fields of a metrics row that must not depend on interruptions (everything but wall-clock timings)
EXACT = (
    "step",
    "phase",
    "loss",
    "aux",
    "lr",
    "temperature",
    "hard",
    "experts_per_token",
    "max_experts_per_token",
    "dropped_fraction",
    "load_cv",
    "entropy",
    "tokens_per_expert",
    "grad_norm",
    "flops",
    "tokens",
    "skipped_steps",
)

# (signal, first step at which it may arrive, last step): the rows a run has logged when it is hit.
# Phases of tiny_args: diversify steps 1-10, sparsify 11-30 (tau decays over 11-20), sparse 31-40;
# checkpoints every 3 steps, so a SIGKILL resumes up to 2 steps back, often across a boundary.
PLAN = (
    (signal.SIGKILL, 8, 11),  # around the spawn (step 11 is the first sparsify step)
    (signal.SIGTERM, 14, 19),  # during the temperature decay
    (signal.SIGKILL, 29, 32),  # around the soft -> hard switch (step 31 is the first sparse step)
)
# SIGINT, and a SIGKILL before the first checkpoint, are tested in-process below (each process start
# costs seconds on a shared 2-core machine).


def rows_logged(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def interrupt_at(cmd, env, metrics: Path, sig: signal.Signals, at_rows: int, rng: random.Random, log: Path):
    """Start ``cmd``, wait until ``metrics`` has ``at_rows`` rows, wait a random few ms (so the signal lands
    inside a step, an evaluation or a checkpoint write), send ``sig``, return (returncode, stderr)."""
    resumed = "--resume" in cmd
    with open(log, "w") as err_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    try:
        deadline = time.monotonic() + 120
        # a resumed run first truncates metrics.jsonl to its checkpoint: count rows only after that
        while (
            resumed and "resum" not in log.read_text() and "starting a new run" not in log.read_text()
        ) or (rows_logged(metrics) < at_rows):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"run ended before {at_rows} rows (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def exact_view(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in EXACT} for r in rows]


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, cli_env, tiny_args, tiny_run):
    seed = int(os.environ.get("EVOMOE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomoe", "train", *tiny_args, "--out", str(out)]
    metrics = out / "metrics.jsonl"
    history = []
    for i, (sig, lo, hi) in enumerate(PLAN):
        at = rng.randint(lo, hi)
        rc, err = interrupt_at(
            cmd + (["--resume"] if i else []), cli_env, metrics, sig, at, rng, tmp_path / f"stderr_{i}.txt"
        )
        history.append((sig.name, at, rc))
        note = f"kill seed {seed} (rerun with EVOMOE_KILL_SEED={seed}); history {history}\n{err[-2000:]}"
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, note
        else:  # a clean stop: checkpoint written at the step reached, exit status 130, no traceback
            assert rc == 130, note
            assert f"{sig.name}: checkpoint saved at step" in err and "Traceback" not in err, note
            step = int(err.split(f"{sig.name}: checkpoint saved at step ")[1].split(";")[0])
            assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}", note
    proc = subprocess.run(cmd + ["--resume"], env=cli_env, capture_output=True, text=True, timeout=300)
    note = f"kill seed {seed} (rerun with EVOMOE_KILL_SEED={seed}); history {history}"
    assert proc.returncode == 0, f"{note}\n{proc.stderr[-3000:]}"

    got, want = read_jsonl(metrics), read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 41)), note  # no row lost, none duplicated
    for a, b in zip(exact_view(got), exact_view(want), strict=True):
        assert a == b, f"{note}: step {a['step']} differs:\n{a}\n{b}"
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(tiny_run / "eval.jsonl"), note
    final = out / "checkpoints" / "step_00000040" / "manifest.json"
    ref = tiny_run / "checkpoints" / "step_00000040" / "manifest.json"
    got_w = json.loads(final.read_text())["files"]["model.safetensors"]
    assert got_w == json.loads(ref.read_text())["files"]["model.safetensors"], f"{note}: final weights differ"


# ----------------------------------------------------------------------------------------------------
# in-process: a stop between two log lines


def short_cfg(**over):
    args = [
        "--train.steps=12",
        "--evolve.diversify_steps=4",
        "--gate.decay_steps=4",
        "--gate.hard_after=4",
        "--train.threads=1",
        "--train.eval_every=12",
        "--train.ckpt_every=100",
        "--train.eval_batches=1",
    ] + [f"--{k.replace('__', '.')}={v}" for k, v in over.items()]
    return load_config("tiny", args)


def run_rows(cfg, out: Path, env, stop_after: int | None = None, resume: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out, env=env, log=lambda s: None, progress=False)
    if resume:
        trainer.restore(sorted((out / "checkpoints").glob("step_*"))[-1])
    if stop_after is not None:  # what the SIGTERM handler does, at a chosen step
        original = trainer.train_step

        def step_then_stop(step, interval):
            original(step, interval)
            if step + 1 == stop_after:
                trainer.stop_requested = "SIGTERM"

        trainer.train_step = step_then_stop
    trainer.run()
    return read_jsonl(out / "metrics.jsonl")


def test_interval_stats_state_round_trip():
    torch.manual_seed(0)
    a, b = IntervalStats(), IntervalStats()
    from evomoe.moe.layer import LayerStats

    def stats():
        counts = torch.randint(0, 9, (4,))
        return [
            LayerStats(torch.tensor(32), counts.sum(), torch.tensor(0), counts.max(), counts, torch.rand(()))
        ]

    for _ in range(3):
        s, loss = stats(), torch.rand(())
        a.add(loss, {"balance": torch.rand(())}, s, torch.rand(()))
    b.load_state_dict(a.state_dict())
    s, loss, aux, g = stats(), torch.rand(()), {"balance": torch.rand(())}, torch.rand(())
    a.add(loss, aux, s, g)
    b.add(loss, aux, s, g)
    assert a.row() == b.row()


def test_stop_between_log_lines_resumes_the_same_rows(tmp_path, evomoe_cache):
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    cfg = short_cfg(train__log_every=4)
    want = run_rows(cfg, tmp_path / "ref", env)
    run_rows(short_cfg(train__log_every=4), tmp_path / "cut", env, stop_after=6)
    got = run_rows(short_cfg(train__log_every=4), tmp_path / "cut", env, resume=True)
    assert [r["step"] for r in got] == [4, 8, 12]
    assert exact_view(got) == exact_view(want)


SHORT_ARGS = ["tiny", "--no-progress", *short_overrides(eval_every=6, ckpt_every=4, log_every=1)]


def test_sigint_saves_and_a_kill_before_the_first_checkpoint_starts_over(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Trainer.train_step
    sent = []

    def step_with_sigint(self, step, interval):
        original(self, step, interval)
        if step + 1 == 6 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: the step completes

    monkeypatch.setattr(Trainer, "train_step", step_with_sigint)
    rc, stdout, err = cli("train", *SHORT_ARGS, "--out", out)
    assert rc == 130, err
    assert "SIGINT: checkpoint saved at step 6; resume with --resume" in err
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 7))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    # now as if the process had been SIGKILLed mid-row before its first checkpoint was written
    import shutil

    shutil.rmtree(out / "checkpoints")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "phase": "sp')
    rc, stdout, err = cli("train", *SHORT_ARGS, "--out", out, "--resume")
    assert rc == 0, err
    assert "no checkpoint" in err and "starting a new run" in err
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # the old rows were dropped, not duplicated
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [6, 12]


def test_signal_handlers_restored_when_run_fails_early(tmp_path, evomoe_cache):
    cfg = short_cfg()
    trainer = Trainer(
        cfg, tmp_path / "missing", env={"EVOMOE_CACHE": str(evomoe_cache)}, log=lambda s: None, progress=False
    )
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(OSError):
            trainer.run()  # the run directory does not exist: metrics.jsonl cannot be opened
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
