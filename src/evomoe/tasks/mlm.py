"""The masked-LM task (RoBERTa): the LM's corpora, ``<s>`` + a window of text, dynamic masking.

A training batch is a pure function of (seed, step): the windows come from the LM's token data
(``default_rng([seed, step])``), the masking from ``default_rng([seed, step, MASK_STREAM])``. Validation
uses fixed windows masked with fixed draws, so evaluations compare across steps and runs. Metrics: the
masked-token loss (nats), its perplexity, and the accuracy of the argmax at the masked positions.
Legend: B batch, S sequence (= model.seq_len: ``<s>`` plus seq_len - 1 text tokens), V vocabulary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data import load_token_data
from ..data.masking import mask_batch
from ..data.tokenizer import SpecialTokens
from .seq_metrics import IGNORE, nll_and_correct

VAL_STEP = 1 << 40  # the masking draws of validation batch i use step VAL_STEP + i: never a training step


@dataclass
class MLMOptions:
    mask_prob: float = 0.15  # share of the text tokens selected (80% <mask>, 10% random, 10% unchanged)


def validate_options(opts: MLMOptions) -> None:
    if not 0.0 < opts.mask_prob < 1.0:
        raise ConfigError(f"task.mlm.mask_prob = {opts.mask_prob!r}: must be in (0, 1)")


class MLMTask:
    name = "mlm"
    model_kinds = ("encoder",)

    def __init__(
        self,
        cfg: Config,
        opts: MLMOptions,
        env: Mapping[str, str] = os.environ,
        log: Callable = print,
        data=None,
    ) -> None:
        validate_options(opts)
        self.cfg, self.opts = cfg, opts
        if cfg.model.seq_len < 2:
            raise ConfigError(f"model.seq_len = {cfg.model.seq_len}: the masked LM needs >= 2 (<s> + text)")
        self.data = data or load_token_data(cfg.data, cfg.model.seq_len - 1, cfg.train.batch_size, env, log)
        self.tokenizer = SpecialTokens(self.data.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _mask(self, text_BS: torch.Tensor, seed: int, step: int) -> dict[str, torch.Tensor]:
        B = text_BS.shape[0]
        ids = torch.cat([torch.full((B, 1), self.tokenizer.bos_id, dtype=torch.long), text_BS], 1)
        maskable = ids < self.tokenizer.num_normal
        inputs, targets = mask_batch(
            ids, maskable, seed, step, self.tokenizer.mask_id, self.tokenizer.num_normal, self.opts.mask_prob
        )
        return {"ids": inputs, "valid": torch.ones_like(ids, dtype=torch.bool), "targets": targets}

    def train_batch(self, step: int, seed: int) -> dict[str, torch.Tensor]:
        x, _ = self.data.train_batch(step, seed, self.cfg.train.batch_size, self.cfg.model.seq_len - 1)
        return self._mask(x, seed, step)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        t = self.cfg.train
        windows = self.data.val_batches(t.eval_batches, t.batch_size, self.cfg.model.seq_len - 1)
        return [self._mask(x, t.seed, VAL_STEP + i) for i, (x, _) in enumerate(windows)]

    def loss(self, out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the masked positions (0 with gradient when a batch masks nothing)."""
        logits = out.logits.float().reshape(-1, out.logits.shape[-1])
        target = batch["targets"].reshape(-1)
        total = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
        return total / (target != IGNORE).sum().clamp_min(1)

    @torch.no_grad()
    def evaluate(self, model, gate, device: torch.device, autocast=None) -> dict[str, float]:
        nll, correct, n, pairs, tokens = 0.0, 0, 0, 0.0, 0
        for batch in self.val_batches():
            inputs = {k: v.to(device) for k, v in batch.items()}
            with autocast() if autocast else torch.no_grad():
                out = model(inputs, gate)
            s, c, k = nll_and_correct(
                out.logits.reshape(-1, out.logits.shape[-1]), inputs["targets"].reshape(-1)
            )
            nll, correct, n = nll + s, correct + c, n + k
            T = inputs["ids"].numel()
            if out.stats:
                pairs += sum(float(st.pairs) / float(st.tokens) for st in out.stats) / len(out.stats) * T
            tokens += T
        loss = nll / max(n, 1)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "masked_accuracy": correct / max(n, 1),
            "masked_tokens": n,
            "experts_per_token": pairs / max(tokens, 1),
        }

    def token_counts(self) -> torch.Tensor:
        counts = np.bincount(np.asarray(self.data.train), minlength=self.vocab_size)[: self.vocab_size]
        return torch.from_numpy(counts.astype(np.int64))

    def dense_flops_per_token(self, model_cfg) -> float:
        """Forward FLOPs per token outside the FFNs: projections, bidirectional scores, the MLM head."""
        D, L, S, V = model_cfg.d_model, model_cfg.n_layers, model_cfg.seq_len, self.vocab_size
        return 2 * 4 * D * D * L + 2 * 2 * D * S * L + 2 * D * D + 2 * D * V
