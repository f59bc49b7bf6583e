"""Gradient accumulation (``train.accum_steps``): the step's rows in micro-batches give the gradients of the
mean loss (the same run as one batch up to float rounding), ``balance = "global"`` counts every micro-batch
of the step through the trainer, and a run with accumulation resumes bitwise."""

from __future__ import annotations

import pytest
import torch
from short_run import run_trainer, short_overrides
from test_resume import exact_view

from evomoe.config import ConfigError, load_config
from evomoe.moe.balance import Balancer
from evomoe.train.metrics import read_jsonl
from evomoe.train.setup import TrainingError, check_accumulation


def config(*extra: str):
    return load_config("tiny", short_overrides(log_every=1, ckpt_every=6, eval_every=12) + list(extra))


@pytest.mark.parametrize("router", ["dense", "topk"])
def test_micro_batches_train_as_one_batch(tmp_path, cli_env, router):
    """The mean of equal micro-batch means is the batch mean, so the runs agree to rounding (top-k without
    its balance loss, which is a per-batch statistic)."""
    topk = ["--router.name=topk", "--router.topk.aux_weight=0"]
    moe = ["--moe.enabled=false"] if router == "dense" else topk
    runs = {}
    for n in (1, 4):
        out = tmp_path / f"a{n}"
        run_trainer(config(f"--train.accum_steps={n}", *moe), out, cli_env)
        runs[n] = read_jsonl(out / "metrics.jsonl")
    assert len(runs[1]) == len(runs[4]) == 12
    for a, b in zip(runs[1], runs[4]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5, abs=2e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4)
        assert a["tokens"] == b["tokens"] and a["flops"] == pytest.approx(b["flops"], rel=1e-9)


def test_global_balance_counts_every_micro_batch_of_the_step(tmp_path, cli_env, monkeypatch):
    """What a router's balancer has counted when the step ends (before ``on_step`` forgets it): every token
    of the step's 3 micro-batches, in every MoE layer; a count that kept only the last micro-batch would
    hold a third."""
    seen: list[float] = []
    original = Balancer.on_step

    def record(self):
        seen.append(float(self.step_tokens))
        original(self)

    monkeypatch.setattr(Balancer, "on_step", record)
    cfg = config("--train.accum_steps=3", "--router.name=topk", "--router.topk.balance=global",
                 "--train.batch_size=6")  # fmt: skip
    run_trainer(cfg, tmp_path / "g", cli_env)
    tokens = 6 * cfg.model.seq_len
    assert seen and all(s == tokens for s in seen), (seen[:4], tokens)


def test_a_run_with_accumulation_resumes_bitwise(tmp_path, cli_env):
    cfg = config("--train.accum_steps=2")
    run_trainer(cfg, tmp_path / "ref", cli_env)
    cut = tmp_path / "cut"
    run_trainer(cfg, cut, cli_env, stop_after=6)
    run_trainer(cfg, cut, cli_env, resume=True)
    want = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert exact_view(read_jsonl(cut / "metrics.jsonl")) == exact_view(want)


def test_accumulation_must_split_the_rows_evenly():
    with pytest.raises(ConfigError, match=r"train\.accum_steps = 3: must divide train\.batch_size = 8"):
        load_config("tiny", ["--train.batch_size=8", "--train.accum_steps=3"])
    with pytest.raises(TrainingError, match=r"train\.accum_steps = 4: .* over 2 processes gives 3 rows"):
        check_accumulation(6, 4, 2)
    check_accumulation(8, 2, 2)
    assert torch.tensor_split(torch.arange(8), 4)[1].tolist() == [2, 3]  # the micro-batches are row blocks
