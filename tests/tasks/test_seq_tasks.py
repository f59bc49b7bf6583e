"""The masked-LM and translation tasks on generated data: batches are a pure function of (seed, step),
the loss ignores padding and unmasked positions, evaluation reports the task's metrics (and writes the
decoded sentences), and the generated transduction is learnable by the encoder-decoder."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from evomoe.config import Config
from evomoe.models.encdec import EncoderDecoder
from evomoe.models.encoder import MaskedLM
from evomoe.moe.router import GateState
from evomoe.tasks.base import Batch, EvalContext
from evomoe.tasks.mlm import MLMTask
from evomoe.tasks.mt import MTTask, pair_to_batch


def small_cfg(tmp_path, task: str, seq_len=32) -> Config:
    cfg = Config()
    cfg.task.name = task
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 32, 2, 2, seq_len, 64
    cfg.moe.num_experts = 4
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.tokenizer, cfg.data.vocab_size = "bpe", 300
    cfg.train.batch_size, cfg.train.eval_batches = 8, 2
    return cfg


def eval_ctx(model, step=0, out_dir=None) -> EvalContext:
    model.eval()

    def forward(batch: Batch):
        return model(**batch.inputs, gate=GateState()), batch

    return EvalContext(forward, lambda xs: xs, model, GateState(), torch.device("cpu"), step, out_dir)


@pytest.fixture
def mlm_task(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(800)))
    cfg = small_cfg(tmp_path, "mlm")
    cfg.data.corpus, cfg.data.tokenizer = str(corpus), "bytes"
    task = MLMTask(cfg, {}, lambda s: None)
    cfg.model.vocab_size = task.vocab_size
    return task


def test_mlm_batches_pure_and_masked(mlm_task):
    a, b, c = mlm_task.train_batch(3), mlm_task.train_batch(3), mlm_task.train_batch(4)
    assert torch.equal(a.inputs["tokens_BS"], b.inputs["tokens_BS"])
    assert torch.equal(a.targets["targets_BS"], b.targets["targets_BS"])
    assert not torch.equal(a.targets["targets_BS"], c.targets["targets_BS"])
    tok, ids, targets = mlm_task.tokenizer, a.inputs["tokens_BS"], a.targets["targets_BS"]
    assert (ids[:, 0] == tok.bos_id).all() and (targets[:, 0] == -100).all()
    assert ids.shape == (8, 32) and 0.08 < float((targets != -100).float().mean()) < 0.22
    assert mlm_task.vocab_size == 260 and mlm_task.token_counts().shape == (260,)


def test_mlm_loss_and_eval(mlm_task):
    cfg = mlm_task.cfg
    model = MaskedLM(cfg.model, cfg.moe)
    batch = mlm_task.train_batch(0)
    out = model(**batch.inputs, gate=GateState())
    loss = mlm_task.loss(out, batch)
    y = batch.targets["targets_BS"]
    sel = y != -100
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits[sel], y[sel]))
    row = mlm_task.evaluate(eval_ctx(model))
    assert set(row) == set(mlm_task.metric_names) and 0 <= row["masked_accuracy"] <= 1
    assert row == mlm_task.evaluate(eval_ctx(model))  # fixed validation masking
    assert mlm_task.forward_dense_flops(batch) > 0


def test_mlm_baseline_is_the_most_frequent_masked_target(tmp_path):
    """``masked_baseline_accuracy``: always answering the most frequent target of the masked validation
    positions, counted here directly from the validation batches; a model whose argmax is that token
    everywhere scores exactly it."""
    corpus, rng = tmp_path / "skewed.txt", random.Random(1)
    corpus.write_text("\n".join(" ".join(rng.choice(["mmmm", "mmmm", "ab", "cd"]) for _ in range(9))
                                 for _ in range(600)))  # fmt: skip
    cfg = small_cfg(tmp_path, "mlm")
    cfg.data.corpus, cfg.data.tokenizer, cfg.train.eval_batches = str(corpus), "bytes", 4
    mlm_task = MLMTask(cfg, {}, lambda s: None)
    targets = torch.cat([b.targets["targets_BS"].reshape(-1) for b in mlm_task.val_batches()])
    targets = targets[targets != -100]
    top2 = torch.bincount(targets).topk(2)
    top, count = int(top2.indices[0]), int(top2.values[0])
    assert count > int(top2.values[1]) and count < targets.numel()  # one most frequent token, not the only

    class Constant(torch.nn.Module):  # logits favouring one token at every position
        def forward(self, tokens_BS, **_):
            logits = torch.zeros(*tokens_BS.shape, mlm_task.vocab_size)
            logits[..., top] = 1.0
            return type("Out", (), {"logits": logits})()

    row = mlm_task.evaluate(eval_ctx(Constant()))
    assert row["masked_baseline_accuracy"] == pytest.approx(count / targets.numel())
    assert row["masked_accuracy"] == pytest.approx(row["masked_baseline_accuracy"])


def mt_task(tmp_path, pairs=3000):
    cfg = small_cfg(tmp_path, "mt", seq_len=24)
    o = cfg.task.mt
    o.synthetic_pairs, o.synthetic_words, o.synthetic_max_words = pairs, 8, 5
    o.eval_sentences, o.val_fraction = 16, 0.05
    task = MTTask(cfg, {}, lambda s: None)
    cfg.model.vocab_size = task.vocab_size
    return task


def test_mt_batches_pure_and_padding_ignored(tmp_path):
    task = mt_task(tmp_path)
    a, b = task.train_batch(7), task.train_batch(7)
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    valid = a.inputs["tgt_valid_BT"]
    assert ((a.targets["targets_BT"] == -100) == ~valid).all()
    model = EncoderDecoder(task.cfg.model, task.cfg.moe)
    out = model(**a.inputs, gate=GateState())
    junk = dict(a.inputs)
    junk["tgt_BT"] = a.inputs["tgt_BT"].masked_fill(~valid, 5)
    junk["src_BS"] = a.inputs["src_BS"].masked_fill(~a.inputs["src_valid_BS"], 5)
    torch.testing.assert_close(task.loss(model(**junk, gate=GateState()), a), task.loss(out, a))


@pytest.mark.slow
def test_mt_learns_the_transduction(tmp_path):
    torch.manual_seed(0)
    task = mt_task(tmp_path, pairs=4000)
    model = EncoderDecoder(task.cfg.model, task.cfg.moe)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    before = task.evaluate(eval_ctx(model))
    model.train()
    for step in range(200):
        batch = task.train_batch(step)
        task.loss(model(**batch.inputs, gate=GateState()), batch).backward()
        opt.step()
        opt.zero_grad()
    after = task.evaluate(eval_ctx(model, 200, tmp_path))
    assert after["val_loss"] < before["val_loss"] - 1.0, (before, after)
    assert after["chrf"] > before["chrf"] + 5, (before, after)
    rows = [json.loads(x) for x in (tmp_path / "translations" / "step_000200.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"source", "reference", "greedy", "beam"} == set(rows[0])


@pytest.mark.parametrize("sentences, scored", [(5, 5), (0, None), (-1, 0)])
def test_mt_eval_sentences_all_some_or_none(tmp_path, sentences, scored):
    """``eval_sentences``: the first N validation pairs; 0: all of them; -1: no decoding (loss only).
    Scores come with their sacrebleu signatures and the number of sentences scored."""
    task = mt_task(tmp_path, pairs=600)
    task.opts.eval_sentences = sentences
    torch.manual_seed(0)
    model = EncoderDecoder(task.cfg.model, task.cfg.moe)
    row = task.evaluate(eval_ctx(model, 3, tmp_path))
    n_val = len(task.data.val_src)
    assert n_val > 5
    if scored == 0:
        assert set(row) == {"val_loss", "val_ppl"} and not (tmp_path / "translations").exists()
        return
    expected = n_val if scored is None else scored
    assert row["eval_sentences"] == expected
    assert row["bleu_signature"].startswith("nrefs:1|") and "tok:13a" in row["bleu_signature"]
    assert row["chrf_signature"].startswith("nrefs:1|") and "nc:6" in row["chrf_signature"]
    lines = (tmp_path / "translations" / "step_000003.jsonl").read_text().splitlines()
    assert len(lines) == expected


@pytest.mark.parametrize("which", ["mlm", "mt"])
def test_loss_of_split_batch_averages_to_the_full_batch(tmp_path, mlm_task, which):
    """Data-parallel ranks each hold an equal share of the rows (with different numbers of targets): the
    mean of their losses must be the whole batch's loss, or their averaged gradients differ from one
    process's (a per-rank mean over its own targets would not be)."""
    task = mlm_task if which == "mlm" else mt_task(tmp_path)
    model_cls = MaskedLM if which == "mlm" else EncoderDecoder
    torch.manual_seed(0)
    model = model_cls(task.cfg.model, task.cfg.moe)
    key = "targets_BS" if which == "mlm" else "targets_BT"
    for step in range(20):  # a batch whose halves hold different numbers of targets: the case that matters
        batch = task.train_batch(step)
        halves = [batch.map(lambda t: t[:4]), batch.map(lambda t: t[4:])]
        if len({int((h.targets[key] != -100).sum()) for h in halves}) == 2:
            break
    full = task.loss(model(**batch.inputs, gate=GateState()), batch)
    parts = [task.loss(model(**h.inputs, gate=GateState()), h) for h in halves]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full)


def test_mt_loss_is_label_smoothed_cross_entropy_over_the_real_targets(tmp_path):
    """The value of the MT loss against label-smoothed cross-entropy written out independently: over the
    target positions that hold a token (padding neither in the sum nor in the count), eps = 0.1."""
    task = mt_task(tmp_path)
    lengths = np.array([len(t) for t in task.data.train_tgt])
    order = np.argsort(lengths, kind="stable")
    index = np.concatenate([order[:4], order[-4:]])  # the shortest and longest targets: much padding
    batch = pair_to_batch(task._pairs(task.data.train_src, task.data.train_tgt, index))
    torch.manual_seed(0)
    model = EncoderDecoder(task.cfg.model, task.cfg.moe)
    out = model(**batch.inputs, gate=GateState())
    real_BT = batch.inputs["tgt_valid_BT"]
    assert (~real_BT).sum() > 0.25 * real_BT.numel()
    logp_BTV = torch.log_softmax(out.logits.detach().double(), -1)
    eps, V = task.opts.label_smoothing, logp_BTV.shape[-1]
    assert eps > 0
    target_BT = batch.targets["targets_BT"]
    total, count = 0.0, 0
    for b, t in real_BT.nonzero().tolist():
        y = int(target_BT[b, t])
        total += -(1 - eps) * float(logp_BTV[b, t, y]) - eps / V * float(logp_BTV[b, t].sum())
        count += 1
    torch.testing.assert_close(
        task.loss(out, batch).double(), torch.tensor(total / count, dtype=torch.float64)
    )


def test_mlm_random_replacements_are_ordinary_tokens_and_cover_the_vocabulary(mlm_task):
    """The 10% random replacements come from the text vocabulary: never <pad>, <mask>, <s>, </s>, and
    (over ~1000 draws from 256 byte ids) most of it is drawn."""
    tok = mlm_task.tokenizer
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, tok.num_normal, (64, 255), generator=g)
    replaced = []
    for step in range(4):
        batch = mlm_task.masked(text, seed=0, step=step)
        inputs, targets = batch.inputs["tokens_BS"], batch.targets["targets_BS"]
        random = (targets != -100) & (inputs != tok.mask_id) & (inputs != targets)
        replaced.append(inputs[random])
    replaced = torch.cat(replaced)
    assert replaced.numel() > 600
    specials = {tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id}
    assert not set(replaced.tolist()) & specials and int(replaced.max()) < tok.num_normal
    assert len(set(replaced.tolist())) > 0.85 * tok.num_normal
