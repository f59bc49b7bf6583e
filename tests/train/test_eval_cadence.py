"""Evaluation leaves training untouched (RNG, data order), and ``log_every`` / ``eval_every`` may change on
--resume without changing what is trained: only which rows get written."""

from __future__ import annotations

import json
import os
import signal

import pytest
from short_run import short_overrides
from test_resume import exact_view

from evomoe.train.metrics import read_jsonl
from evomoe.train.trainer import Trainer


def final_weights(out) -> str:
    manifest = out / "checkpoints" / "step_00000012" / "manifest.json"
    return json.loads(manifest.read_text())["files"]["model.safetensors"]


def test_evaluating_more_often_changes_no_training_row(cli, tmp_path):
    """Every 2 steps vs only at the end: the same per-step losses, gate values and weights (the soft phase's
    Gumbel noise comes from the global RNG, which evaluation must leave where it was)."""
    outs = {}
    for every in (2, 12):
        outs[every] = tmp_path / f"eval{every}"
        args = short_overrides(eval_every=every, ckpt_every=12, log_every=1)
        rc, _, err = cli("train", "tiny", "--no-progress", *args, "--out", outs[every])
        assert rc == 0, err
    often, once = (read_jsonl(outs[e] / "metrics.jsonl") for e in (2, 12))
    assert len(read_jsonl(outs[2] / "eval.jsonl")) == 6 and len(read_jsonl(outs[12] / "eval.jsonl")) == 1
    assert exact_view(often) == exact_view(once)
    assert final_weights(outs[2]) == final_weights(outs[12])
    assert read_jsonl(outs[2] / "eval.jsonl")[-1] == read_jsonl(outs[12] / "eval.jsonl")[-1]


def test_changing_log_and_eval_intervals_on_resume(cli, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    rc, _, err = cli(
        "train",
        "tiny",
        "--no-progress",
        *short_overrides(eval_every=6, ckpt_every=3, log_every=1),
        "--out",
        ref,
    )
    assert rc == 0, err
    want = read_jsonl(ref / "metrics.jsonl")

    out = tmp_path / "cut"
    original = Trainer.train_step

    def stop_after_5(self, step, interval):
        original(self, step, interval)
        if step + 1 == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler sets a flag: checkpoint at step 5, stop

    monkeypatch.setattr(Trainer, "train_step", stop_after_5)
    rc, _, err = cli(
        "train",
        "tiny",
        "--no-progress",
        *short_overrides(eval_every=6, ckpt_every=3, log_every=1),
        "--out",
        out,
    )
    assert rc == 130 and "checkpoint saved at step 5" in err, err
    monkeypatch.setattr(Trainer, "train_step", original)
    rc, _, err = cli(
        "train",
        "tiny",
        "--no-progress",
        *short_overrides(eval_every=4, ckpt_every=3, log_every=3),
        "--out",
        out,
        "--resume",
    )
    assert rc == 0 and "(step 5)" in err and "resuming from" in err, err

    got = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 9, 12]  # every step, then every 3rd
    assert exact_view(got[:5]) == exact_view(want[:5])
    for row in got[5:]:  # a row of the new interval: the mean over the steps it covers
        covered = [
            r["loss"] for r in want if row["step"] - (1 if row["step"] == 6 else 3) < r["step"] <= row["step"]
        ]
        assert row["loss"] == pytest.approx(sum(covered) / len(covered), rel=1e-6)
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [8, 12]  # none before the stop at 5
    assert read_jsonl(out / "eval.jsonl")[-1]["val_loss"] == read_jsonl(ref / "eval.jsonl")[-1]["val_loss"]
    assert final_weights(out) == final_weights(ref)
