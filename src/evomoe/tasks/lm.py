"""Causal language modelling (the paper's GPT task): next-token cross-entropy on a tokenized corpus.

Batches are random windows, a pure function of (seed, step) (``data.TokenData``); validation is a fixed
set of evenly spaced windows; metrics: loss (nats/token), perplexity and bits per UTF-8 byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError, DataConfig
from ..data import TokenData, load_token_data
from ..data.tokenizer import PretrainedTokenizer, Tokenizer
from ..models.hf.config import CONFIG_FILE
from ..models.hf.load import check_tokenizer_fits, tokenizer_path
from ..registry import TASKS
from .base import Batch, EvalContext, Task
from .flops import dense_token_flops


def lm_batch(x_BS: torch.Tensor, y_BS: torch.Tensor) -> Batch:
    return Batch({"tokens_BS": x_BS}, {"targets_BS": y_BS}, x_BS.numel())


def next_token_loss(
    logits_BSV: torch.Tensor, targets_BS: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy in float32; targets of -100 are ignored."""
    V = logits_BSV.shape[-1]
    return F.cross_entropy(
        logits_BSV.float().view(-1, V), targets_BS.reshape(-1), ignore_index=-100, reduction=reduction
    )


def lm_forward(model: Any, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, **kwargs: Any):
    """``model(tokens_BS, **kwargs)`` with ``out.loss`` set to the next-token loss on ``targets_BS`` (padding
    in ``valid_BS`` ignored): a decoder LM step without a trainer, for tests, notebooks and benchmarks."""
    out = model(tokens_BS, **kwargs)
    if targets_BS is not None:
        valid_BS = kwargs.get("valid_BS")
        targets = targets_BS if valid_BS is None else targets_BS.masked_fill(~valid_BS, -100)
        out.loss = next_token_loss(out.logits, targets)
    return out


def model_tokenizer(cfg: Any) -> tuple[Tokenizer | None, DataConfig]:
    """With ``model.init_from``: the model's own tokenizer (checked against its embedding) and the data
    config naming it (the token cache is keyed by the file's hash); else (None, ``cfg.data``)."""
    directory = cfg.model.init_from
    if not directory:
        return None, cfg.data
    path = tokenizer_path(directory)
    try:
        tok = PretrainedTokenizer.from_file(path)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    check_tokenizer_fits(path, tok.vocab_size, cfg.model.vocab_size, path.parent / CONFIG_FILE)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return tok, dataclasses.replace(cfg.data, tokenizer=f"pretrained:{digest}")


@TASKS.register("lm")
class LMTask(Task):
    model_kinds = ("decoder",)
    default_model = "decoder"
    metric_names = ("val_loss", "val_ppl", "val_bpb")
    headline = (
        ("val_loss", "validation loss", ".4f"),
        ("val_ppl", "perplexity", ".2f"),
        ("val_bpb", "bits/byte", ".4f"),
    )

    def __init__(self, cfg: Any, env: Any, log: Callable[[str], None], data: TokenData | None = None) -> None:
        super().__init__(cfg, env, log)
        t = cfg.train
        if data is None:
            tok, data_cfg = model_tokenizer(cfg)
            data = load_token_data(
                data_cfg, cfg.model.seq_len, t.batch_size, env=env or {}, log=log, tokenizer=tok
            )
        self.data = data

    @property
    def vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size

    def train_batch(self, step: int) -> Batch:
        t = self.cfg.train
        return lm_batch(*self.data.train_batch(step, t.seed, t.batch_size, self.cfg.model.seq_len))

    def val_batches(self) -> list[Batch]:
        t = self.cfg.train
        return [
            lm_batch(x, y)
            for x, y in self.data.val_batches(t.eval_batches, t.batch_size, self.cfg.model.seq_len)
        ]

    def loss(self, out: Any, batch: Batch) -> torch.Tensor:
        return next_token_loss(out.logits, batch.targets["targets_BS"])

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        total_loss, total_tokens, total_bytes = 0.0, 0, 0.0
        for batch in self.val_batches():
            out, local = ctx.forward(batch)
            y = local.targets["targets_BS"]
            total_loss += float(next_token_loss(out.logits, y, "sum"))
            total_tokens += y.numel()
            total_bytes += float(self.data.target_bytes(y))
        total_loss, total_tokens, total_bytes = ctx.sum_over_ranks([total_loss, total_tokens, total_bytes])
        val_loss = total_loss / total_tokens
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bpb": total_loss / math.log(2) / max(total_bytes, 1.0),
        }

    def token_counts(self) -> torch.Tensor:
        return torch.from_numpy(self.data.token_counts(self.cfg.model.vocab_size))

    def passes(self, tokens: int) -> float:
        return self.data.passes(tokens)

    def provenance(self) -> dict[str, Any]:
        return self.data.provenance()

    def forward_dense_flops(self, batch: Batch) -> float:
        m = self.cfg.model
        return batch.inputs["tokens_BS"].numel() * dense_token_flops(m, m.seq_len)
