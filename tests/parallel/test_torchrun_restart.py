"""The CLI under torchrun (2 gloo processes): a rank killed mid-run makes torchrun (--max-restarts)
restart the job, which resumes from the last complete checkpoint and finishes with the same weights as an
uninterrupted single-process run (experts saved by global id: the checkpoint does not depend on the
layout)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomoe.cli import main

pytestmark = pytest.mark.distributed

SRC = Path(__file__).resolve().parents[2] / "src"
CONFIG = """
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
d_ff = 64
[moe]
num_experts = 4
[evolve]
diversify_steps = 6
noise = 0.1
[gate]
decay_steps = 6
hard_after = 10
[data]
corpus = "{corpus}"
tokenizer = "bytes"
cache_dir = "{cache}"
[train]
steps = 60
batch_size = 8
warmup_steps = 2
log_every = 5
eval_every = 30
eval_batches = 1
ckpt_every = 5
keep_checkpoints = 20
device = "cpu"
threads = 1
"""


def write_corpus(root: Path) -> None:
    rng = random.Random(0)
    words = "def class return self import from value items index count total result data list".split()
    root.mkdir()
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 9))) for _ in range(60)]
        (root / f"f{i:02d}.txt").write_text("\n".join(lines) + "\n")


def children_with_rank(parent: int, rank: int) -> list[int]:
    """Worker processes of a torchrun agent with RANK=rank (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc (Linux)")
def test_killed_rank_restarts_and_resumes(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "cfg.toml").write_text(CONFIG.format(corpus=tmp_path / "corpus", cache=tmp_path / "cache"))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "ep2"
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--max-restarts", "1", "--monitor-interval", "0.1",
        "-m", "evomoe", "train", str(tmp_path / "cfg.toml"), "--parallel.ep=2", "--out", str(out),
        "--resume", "--no-progress",
    ]  # fmt: skip
    job = subprocess.Popen(
        torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        first = out / "checkpoints" / "step_00000005" / "manifest.json"
        deadline = time.monotonic() + 60
        killed = None
        while killed is None and time.monotonic() < deadline and job.poll() is None:
            if first.exists():
                victims = children_with_rank(job.pid, 1)
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    killed = victims[0]
            time.sleep(0.01)
        log, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:  # a failed wait: do not leave torchrun or its workers behind
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert killed is not None, f"rank 1 was never killed (the run ended too early?)\n{log[-3000:]}"
    assert job.returncode == 0, log[-20000:]
    resumed = re.findall(r"resuming from \S+/step_(\d{8}) \(step (\d+)\)", log)
    assert resumed and all(int(a) == int(b) >= 5 for a, b in resumed), log[-3000:]  # a resume, not a restart
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5)), (
        "metrics rows lost or repeated over the restart"
    )
    assert all(r["a2a_bytes_per_step"] > 0 for r in rows if r["phase"] != "diversify")
    assert json.loads((out / "results.json").read_text())["steps"] == 60

    # the uninterrupted reference: one process (this one: no torch.distributed), same config and global batch
    ref = tmp_path / "one"
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(tmp_path / "cfg.toml"), "--out", str(ref), "--no-progress"]) == 0
        capsys.readouterr()
        # evaluating the ep=2 run's checkpoint in one process (the config says ep=2: eval needs one process)
        assert main(["eval", str(out)]) == 0
        evaluated = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)
    got = load_file(str(out / "checkpoints" / "step_00000060" / "model.safetensors"))
    want = load_file(str(ref / "checkpoints" / "step_00000060" / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=2e-4), name
    final = json.loads((out / "results.json").read_text())
    assert abs(evaluated["val_loss"] - final["val_loss"]) < 1e-5


def torchrun_train(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "evomoe", "train", str(tmp_path / "cfg.toml"), "--parallel.ep=2", "--out", str(out),
        "--no-progress", "--train.steps=20", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_corrupt_checkpoint_mid_run_under_torchrun_falls_back(tmp_path):
    """A run whose newest checkpoint (step 10 of 20, written mid-run) is corrupt resumes on both ranks from
    step 5 and ends with the weights of the uninterrupted run."""
    write_corpus(tmp_path / "corpus")
    (tmp_path / "cfg.toml").write_text(CONFIG.format(corpus=tmp_path / "corpus", cache=tmp_path / "cache"))
    ref = tmp_path / "ref"
    done = torchrun_train(tmp_path, ref)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    for late in ("step_00000015", "step_00000020"):  # as if the job had died right after writing step 10
        shutil.rmtree(cut / "checkpoints" / late)
    (cut / "checkpoints" / "latest").write_text("step_00000010")
    (cut / "results.json").unlink()
    weights = cut / "checkpoints" / "step_00000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x5A
    weights.write_bytes(bytes(data))

    resumed = torchrun_train(tmp_path, cut, "--resume")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-5000:]
    assert "step_00000010" in log and "fails its checksum" in log, log[-3000:]
    assert f"resuming from {cut / 'checkpoints' / 'step_00000005'} (step 5)" in log, log[-3000:]
    assert "starting a new run" not in log
    got = load_file(str(cut / "checkpoints" / "step_00000020" / "model.safetensors"))
    want = load_file(str(ref / "checkpoints" / "step_00000020" / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
