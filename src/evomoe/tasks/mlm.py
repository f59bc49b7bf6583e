"""Masked language modelling (the paper's RoBERTa task): the LM's corpora, ``<s>`` + a window of text,
RoBERTa dynamic masking (``data.masking``), re-drawn every time a sequence is seen.

A training batch is a pure function of (seed, step): the windows come from the LM's token data
(``default_rng([seed, step])``), the masking from ``default_rng([seed, step, MASK_STREAM])``. Validation
uses fixed windows masked with fixed draws, so evaluations compare across steps and runs. Metrics: the
masked-token loss (nats), its perplexity, the accuracy of the argmax at the masked positions, and beside it
``masked_baseline_accuracy``: the accuracy of always predicting the most frequent target token of those
positions (what a model that ignores the context scores at best with one answer).
Legend: B batch, S sequence (= model.seq_len: ``<s>`` plus seq_len - 1 text tokens), V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check
from ..data import TokenData, load_token_data
from ..data.masking import mask_batch
from ..data.tokenizer import SpecialTokens
from ..registry import TASKS
from .base import Batch, EvalContext, Task
from .flops import dense_token_flops
from .seq_metrics import IGNORE, nll_and_correct, norm_rows

VAL_STEP = 1 << 40  # validation batch i is masked with the draws of step VAL_STEP + i: never a training step


@dataclass
class MLMOptions:
    mask_prob: float = 0.15  # share of the text tokens selected (80% <mask>, 10% random, 10% unchanged)

    def validate(self, cfg: Any, prefix: str) -> None:
        check(0.0 < self.mask_prob < 1.0, f"{prefix}.mask_prob", self.mask_prob, "must be in (0, 1)")
        check(
            cfg.model.seq_len >= 2,
            "model.seq_len",
            cfg.model.seq_len,
            "the masked LM needs >= 2 (<s> + text)",
        )


@TASKS.register("mlm")
class MLMTask(Task):
    Options = MLMOptions
    model_kinds = ("encoder",)
    default_model = "encoder"
    metric_names = ("val_loss", "val_ppl", "masked_accuracy", "masked_baseline_accuracy")
    headline = (
        ("val_loss", "masked-token loss", ".4f"),
        ("val_ppl", "perplexity", ".2f"),
        ("masked_accuracy", "masked accuracy", ".4f"),
        ("masked_baseline_accuracy", "most-frequent-token baseline", ".4f"),
    )

    def __init__(self, cfg: Any, env: Any, log: Callable[[str], None], data: TokenData | None = None) -> None:
        super().__init__(cfg, env, log)
        t, text_len = cfg.train, cfg.model.seq_len - 1
        self.data = data or load_token_data(cfg.data, text_len, t.batch_size, env=env or {}, log=log)
        self.tokenizer = SpecialTokens(self.data.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def masked(self, text_BS: torch.Tensor, seed: int, step: int) -> Batch:
        """``<s>`` + the text, masked with the draws of (seed, step); targets -100 where not selected."""
        tok, B = self.tokenizer, text_BS.shape[0]
        ids = torch.cat([torch.full((B, 1), tok.bos_id, dtype=torch.long), text_BS], 1)
        maskable = ids < tok.num_normal
        inputs, targets = mask_batch(
            ids, maskable, seed, step, tok.mask_id, tok.num_normal, self.opts.mask_prob
        )
        valid = torch.ones_like(ids, dtype=torch.bool)
        targets_ = {"targets_BS": targets, "norm_B": norm_rows(targets)}
        return Batch({"tokens_BS": inputs, "valid_BS": valid}, targets_, ids.numel())

    def train_batch(self, step: int) -> Batch:
        t = self.cfg.train
        x, _ = self.data.train_batch(step, t.seed, t.batch_size, self.cfg.model.seq_len - 1)
        return self.masked(x, t.seed, step)

    def val_batches(self) -> list[Batch]:
        t = self.cfg.train
        windows = self.data.val_batches(t.eval_batches, t.batch_size, self.cfg.model.seq_len - 1)
        return [self.masked(x, t.seed, VAL_STEP + i) for i, (x, _) in enumerate(windows)]

    def loss(self, out: Any, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the global batch's masked positions (``norm_rows``)."""
        logits = out.logits.float().reshape(-1, out.logits.shape[-1])
        target = batch.targets["targets_BS"].reshape(-1)
        total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
        return total / batch.targets["norm_B"].sum().float()

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        nll, correct, n = 0.0, 0.0, 0.0
        counts_V = torch.zeros(self.vocab_size, dtype=torch.float64)
        for batch in self.val_batches():
            out, local = ctx.forward(batch)
            V = out.logits.shape[-1]
            targets = local.targets["targets_BS"].reshape(-1)
            s, c, k = nll_and_correct(out.logits.reshape(-1, V), targets)
            nll, correct, n = nll + s, correct + c, n + k
            masked = targets[targets != IGNORE].cpu()
            counts_V += torch.bincount(masked, minlength=self.vocab_size)[: self.vocab_size].double()
        nll, correct, n, *counts = ctx.sum_over_ranks([nll, correct, n, *counts_V.tolist()])
        loss = nll / max(n, 1.0)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "masked_accuracy": correct / max(n, 1.0),
            "masked_baseline_accuracy": max(counts) / max(n, 1.0),
        }

    def token_counts(self) -> torch.Tensor:
        counts = self.data.token_counts(self.vocab_size)[: self.vocab_size]
        counts[self.tokenizer.bos_id] = len(self.data.train) // max(self.cfg.model.seq_len - 1, 1)
        return torch.from_numpy(counts.astype(np.int64))

    def passes(self, tokens: int) -> float:
        seq_len = self.cfg.model.seq_len
        return self.data.passes(tokens * (seq_len - 1) // seq_len)  # a row is <s> + seq_len - 1 text tokens

    def provenance(self) -> dict[str, Any]:
        return self.data.provenance()

    def forward_dense_flops(self, batch: Batch) -> float:
        """Projections, bidirectional scores over all S keys, the head's dense layer and tied projection."""
        m = self.cfg.model
        ids = batch.inputs["tokens_BS"]
        per_token = dense_token_flops(m, ids.shape[1], context=ids.shape[1]) + 2 * m.d_model * m.d_model
        return ids.numel() * per_token
