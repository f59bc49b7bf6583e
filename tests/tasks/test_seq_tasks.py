"""The masked-LM and translation tasks on generated data: batches are a pure function of (seed, step),
the loss ignores padding and unmasked positions, evaluation reports the task's metrics, and the
generated transduction is learnable by the encoder-decoder in a few hundred steps."""

from __future__ import annotations

import json
import random

import pytest
import torch

from evomoe.config import Config
from evomoe.models.encdec import EncoderDecoder
from evomoe.models.encoder import MaskedLM
from evomoe.moe.routing import GateState
from evomoe.tasks.mlm import MLMOptions, MLMTask
from evomoe.tasks.mt import MTOptions, MTTask


def small_cfg(tmp_path, seq_len=32) -> Config:
    cfg = Config()
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 32, 2, 2, seq_len, 64
    cfg.moe.num_experts = 4
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.tokenizer, cfg.data.vocab_size = "bpe", 300
    cfg.train.batch_size, cfg.train.eval_batches = 8, 2
    return cfg


@pytest.fixture
def mlm_task(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(800)))
    cfg = small_cfg(tmp_path)
    cfg.data.corpus, cfg.data.tokenizer = str(corpus), "bytes"
    return MLMTask(cfg, MLMOptions(), env={}, log=lambda s: None)


def test_mlm_batches_pure_and_masked(mlm_task):
    a, b, c = mlm_task.train_batch(3, 0), mlm_task.train_batch(3, 0), mlm_task.train_batch(4, 0)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["targets"], c["targets"])
    tok = mlm_task.tokenizer
    assert (a["ids"][:, 0] == tok.bos_id).all() and (a["targets"][:, 0] == -100).all()
    assert a["ids"].shape == (8, 32) and 0.08 < float((a["targets"] != -100).float().mean()) < 0.22
    assert mlm_task.vocab_size == 260 and mlm_task.token_counts().shape == (260,)


def test_mlm_loss_and_eval(mlm_task):
    cfg = mlm_task.cfg
    cfg.model.vocab_size = mlm_task.vocab_size
    model = MaskedLM(cfg.model, cfg.moe)
    batch = mlm_task.train_batch(0, 0)
    out = model(batch, GateState())
    loss = mlm_task.loss(out, batch)
    sel = batch["targets"] != -100
    ref = torch.nn.functional.cross_entropy(out.logits[sel], batch["targets"][sel])
    torch.testing.assert_close(loss, ref)
    row = mlm_task.evaluate(model.eval(), GateState(), torch.device("cpu"))
    assert {"val_loss", "val_ppl", "masked_accuracy"} <= set(row) and 0 <= row["masked_accuracy"] <= 1
    assert row == mlm_task.evaluate(model, GateState(), torch.device("cpu"))  # fixed validation masking


def mt_task(tmp_path, pairs=3000):
    cfg = small_cfg(tmp_path, seq_len=24)
    opts = MTOptions(synthetic_pairs=pairs, synthetic_words=8, synthetic_max_words=5, eval_sentences=16,
                     val_fraction=0.05)  # fmt: skip
    return MTTask(cfg, opts, env={}, log=lambda s: None)


def test_mt_batches_pure_and_padding_ignored(tmp_path):
    task = mt_task(tmp_path)
    a, b = task.train_batch(7, 1), task.train_batch(7, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ((a["targets"] == -100) == ~a["tgt_valid"]).all()
    cfg = task.cfg
    cfg.model.vocab_size = task.vocab_size
    model = EncoderDecoder(cfg.model, cfg.moe)
    out = model(a, GateState())
    changed = dict(
        a, tgt_in=a["tgt_in"].masked_fill(~a["tgt_valid"], 5), src=a["src"].masked_fill(~a["src_valid"], 5)
    )
    torch.testing.assert_close(task.loss(model(changed, GateState()), a), task.loss(out, a))


@pytest.mark.slow
def test_mt_learns_the_transduction(tmp_path):
    torch.manual_seed(0)
    task = mt_task(tmp_path, pairs=4000)
    cfg = task.cfg
    cfg.model.vocab_size = task.vocab_size
    model = EncoderDecoder(cfg.model, cfg.moe)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    before = task.evaluate(model.eval(), GateState(), torch.device("cpu"))
    model.train()
    for step in range(200):
        batch = task.train_batch(step, 0)
        task.loss(model(batch, GateState()), batch).backward()
        opt.step()
        opt.zero_grad()
    after = task.evaluate(model.eval(), GateState(), torch.device("cpu"), out_dir=tmp_path, step=200)
    assert after["val_loss"] < before["val_loss"] - 1.0, (before, after)
    assert after["chrf"] > before["chrf"] + 5, (before, after)
    rows = [json.loads(x) for x in (tmp_path / "translations" / "step_000200.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"source", "reference", "greedy", "beam"} == set(rows[0])
