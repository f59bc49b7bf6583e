"""Exact resume: a run interrupted at random steps (SIGKILL, SIGTERM, SIGINT), before and after the
spawn, inside the soft phase and after the hard switch, and deterministically inside a checkpoint write,
then resumed, logs bitwise the same per-step losses and ends with bitwise the same weights as the
uninterrupted ``tiny_run``. Training is a pure function of seed and step, so a --resume that ignored the
checkpoints and started over would match too: every resume must also log ``resuming from .../step_N
(step N)`` with the N the kill left behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from short_run import run_trainer, short_overrides

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

# (signal, first row count at which it may arrive, last, the steps the resumed run may start from).
# Phases of tiny_args: diversify steps 1-10 (the spawn happens before step 11), sparsify 11-30 (tau
# decays over 11-20), sparse (hard top-1) 31-40; checkpoints every 3 steps, so a SIGKILL resumes up to
# 3 steps back, and a kill that lands inside a checkpoint write one checkpoint further.
PLAN = (
    (signal.SIGKILL, 7, 8, (6, 9)),  # resumes before the spawn, then spawns
    (signal.SIGTERM, 14, 19, None),  # inside the soft phase: resumes at the step the checkpoint names
    (signal.SIGKILL, 28, 29, (27, 30)),  # resumes in the soft phase, then switches to hard top-1
    (signal.SIGKILL, 35, 36, (33, 36)),  # resumes after the hard switch
)
# SIGINT, and a SIGKILL before the first checkpoint, are tested in-process below (each process start
# costs seconds on a shared 2-core machine).
RESUMED = re.compile(r"resuming from (\S+)/step_(\d{8}) \(step (\d+)\)")


def resumed_step(err: str, out: Path) -> int:
    """The step a run resumed from, checked against the directory it names; fails on a fresh start."""
    found = RESUMED.findall(err)
    assert "starting a new run" not in err and len(found) == 1, f"not a resume:\n{err[-2000:]}"
    where, dir_step, step = found[0]
    assert Path(where) == out / "checkpoints" and int(dir_step) == int(step) > 0, found
    return int(step)


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
        while (resumed and "resuming from" not in log.read_text()) or (rows_logged(metrics) < at_rows):
            if "starting a new run" in log.read_text():
                proc.kill()
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
    history, allowed = [], None
    for i, (sig, lo, hi, next_allowed) in enumerate(PLAN):
        at = rng.randint(lo, hi)
        rc, err = interrupt_at(
            cmd + (["--resume"] if i else []), cli_env, metrics, sig, at, rng, tmp_path / f"stderr_{i}.txt"
        )
        history.append((sig.name, at, rc))
        note = f"kill seed {seed} (rerun with EVOMOE_KILL_SEED={seed}); history {history}\n{err[-2000:]}"
        if allowed is not None:
            history[-1] += (f"resumed from {resumed_step(err, out)}",)
            assert resumed_step(err, out) in allowed, note
        allowed = next_allowed
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, note
        else:  # a clean stop: checkpoint written at the step reached, exit status 130, no traceback
            assert rc == 130, note
            assert f"{sig.name}: checkpoint saved at step" in err and "Traceback" not in err, note
            step = int(err.split(f"{sig.name}: checkpoint saved at step ")[1].split(";")[0])
            assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}", note
            allowed = (step,)
    proc = subprocess.run(cmd + ["--resume"], env=cli_env, capture_output=True, text=True, timeout=300)
    note = f"kill seed {seed} (rerun with EVOMOE_KILL_SEED={seed}); history {history}"
    assert proc.returncode == 0, f"{note}\n{proc.stderr[-3000:]}"
    assert resumed_step(proc.stderr, out) in allowed, f"{note}\n{proc.stderr[-2000:]}"
    assert_same_as_reference(out, tiny_run, note)


def assert_same_as_reference(out: Path, tiny_run: Path, note: str) -> None:
    metrics = out / "metrics.jsonl"

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
    run_trainer(cfg, out, env, stop_after, resume)
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
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN in a background job
    rc, stdout, err = cli("train", *SHORT_ARGS, "--out", out)
    assert rc == 130, err
    assert "SIGINT: checkpoint saved at step 6; resume with --resume" in err
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 7))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

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


# ----------------------------------------------------------------------------------------------------
# deterministic: a SIGKILL inside a checkpoint write, at two points of it

# runs the CLI with the checkpoint writer patched to die (SIGKILL, after writing half of the file) when it
# writes ``argv[2]`` of checkpoint step ``argv[3]``: the manifest (the step's directory is still under its
# temporary name) or the ``latest`` pointer (the directory is complete, the pointer names the previous one)
DIE_IN_WRITE = """
import os, signal, sys
import evomoe.train.checkpoint as ck
from evomoe.cli import main
what, step = sys.argv[2], int(sys.argv[3])
real = ck.write_bytes_atomic
def write_or_die(path, data):
    if path.name == what and (what == "latest" or path.parent.name == f".tmp_step_{step:08d}"):
        if what != "latest" or data == f"step_{step:08d}".encode():
            path.with_name(f".{path.name}.tmp").write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
ck.write_bytes_atomic = write_or_die
sys.exit(main(sys.argv[4:]))
"""


def test_kill_inside_a_checkpoint_write_resumes_from_the_one_before(tmp_path, cli_env, tiny_args, tiny_run):
    out = tmp_path / "run"
    train = ["train", *tiny_args, "--out", str(out)]
    for what, step, before in (("manifest.json", 12, None), ("latest", 24, 9)):
        cmd = [sys.executable, "-c", DIE_IN_WRITE, "-", what, str(step), *train]
        proc = subprocess.run(
            cmd + (["--resume"] if before else []), env=cli_env, capture_output=True, text=True
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        if before:
            assert resumed_step(proc.stderr, out) == before
        assert (out / "checkpoints" / "latest").read_text() == f"step_{step - 3:08d}"
    assert not (out / "checkpoints" / "step_00000012").exists()  # the torn one never got its name
    assert (out / "checkpoints" / "step_00000024" / "manifest.json").is_file()  # complete, not yet named
    proc = subprocess.run(
        [sys.executable, "-m", "evomoe", *train, "--resume"], env=cli_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_step(proc.stderr, out) == 21  # ``latest`` leads: the run goes on from the pointer's step
    assert_same_as_reference(out, tiny_run, "kill inside a checkpoint write")
