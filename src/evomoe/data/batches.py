"""Token data for training: training windows that are a pure function of (seed, step), and a fixed,
evenly spaced set of validation windows.

``data.order = "random"`` draws each step's window starts from ``np.random.default_rng([seed, step])``;
``"shuffled"`` visits every window of the training split once per pass (``tokens.ShuffledWindows``).
Either way the step counter is the whole data position: a run resumed at step k sees exactly the
batches it would have seen without the interruption.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .cache import Log, load_or_build, log_stderr
from .tokenizer import Tokenizer
from .tokens import ShardedTokens, ShuffledWindows


def _windows(tokens, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``tokens[s : s+seq_len]`` and the targets shifted by one: int64 [len(starts), seq_len]."""
    idx = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    win = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


@dataclass(frozen=True)
class TokenData:
    """The tokenized train and validation splits (memory-mapped shards), their tokenizer and the cache's
    manifest."""

    train: ShardedTokens | np.ndarray
    val: ShardedTokens | np.ndarray
    tokenizer: Tokenizer
    meta: dict[str, Any]
    cache_dir: Path
    rebuilt: bool = False  # True when this load (re)built the cache
    order: str = "random"  # data.order
    counts: np.ndarray | None = None  # the training split's token histogram (None: counted on demand)
    _shuffled: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_batch(
        self, step: int, seed: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [batch_size, seq_len], y = x shifted by one; starts: ``default_rng([seed, step])``."""
        if step < 0 or seed < 0:
            raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0")
        if self.order == "shuffled":
            key = (seed, seq_len)
            if key not in self._shuffled:
                self._shuffled[key] = ShuffledWindows(len(self.train), seq_len, seed)
            return _windows(self.train, self._shuffled[key].starts(step, batch_size), seq_len)
        n_starts = len(self.train) - seq_len  # a window holds seq_len + 1 tokens
        if n_starts < 1:
            raise ValueError(
                f"the train split has {len(self.train)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        rng = np.random.default_rng([seed, step])
        return _windows(self.train, rng.integers(0, n_starts, size=batch_size), seq_len)

    def token_counts(self, minlength: int) -> np.ndarray:
        """[>= minlength] how often each id occurs in the training split (from the cache's histogram)."""
        counts = self.counts if self.counts is not None else np.bincount(np.asarray(self.train))
        out = np.zeros(max(minlength, len(counts)), dtype=np.int64)
        out[: len(counts)] = counts
        return out

    def passes(self, tokens: int) -> float:
        """Passes over the training split that ``tokens`` trained tokens make."""
        return tokens / max(len(self.train), 1)

    def provenance(self) -> dict[str, Any]:
        """What identifies these tokens on any machine (the manifest without its machine's paths)."""
        m = self.meta
        keys = ("corpus", "corpus_kind", "packages", "source_files", "content_sha256", "dedup", "n_files")
        out = {k: m.get(k) for k in keys}
        out.update(tokens=m["tokens"], tokenizer=m["tokenizer"], vocab_size=m["vocab_size"])
        out["tokenizer_sha256"] = m.get("files", {}).get("tokenizer.json", {}).get("sha256")
        return out

    def val_starts(self, n_windows: int, seq_len: int) -> np.ndarray:
        """Up to ``n_windows`` evenly spaced, non-overlapping window starts over the validation split."""
        n_fit = (len(self.val) - 1) // seq_len
        if n_fit < 1:
            raise ValueError(
                f"the val split has {len(self.val)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        n = max(1, min(n_windows, n_fit))
        last = len(self.val) - seq_len - 1
        return np.floor(np.linspace(0, last, n)).astype(np.int64) if n > 1 else np.zeros(1, dtype=np.int64)

    def val_batches(
        self, n_batches: int, batch_size: int, seq_len: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of (x, y) over evenly spaced windows of the validation split.

        ``n_batches`` full batches when the split holds that many non-overlapping windows; else as many
        full batches as fit, or a single smaller batch when not even one full batch fits.
        """
        starts = self.val_starts(n_batches * batch_size, seq_len)
        if len(starts) < batch_size:
            return [_windows(self.val, starts, seq_len)]
        n_full = len(starts) // batch_size
        starts = self.val_starts(n_full * batch_size, seq_len)
        return [
            _windows(self.val, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(n_full)
        ]

    def target_bytes(self, y: torch.Tensor | np.ndarray) -> int:
        """UTF-8 bytes of text that the target ids ``y`` stand for (the denominator of bits per byte)."""
        ids = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return int(self.tokenizer.token_bytes[ids].sum())

    @property
    def bytes_per_token(self) -> dict[str, float]:
        """Average UTF-8 bytes per token of each split."""
        return {s: self.meta["text_bytes"][s] / max(1, self.meta["tokens"][s]) for s in ("train", "val")}


def bits_per_byte(loss_sum_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy (nats, over the target tokens) divided by ln 2 and the bytes they cover."""
    return loss_sum_nats / math.log(2) / max(1, n_bytes)


def load_token_data(
    cfg: DataConfig,
    seq_len: int,
    batch_size: int,
    env: Mapping[str, str] = os.environ,
    log: Log = log_stderr,
    tokenizer: Tokenizer | None = None,
) -> TokenData:
    """Tokenized corpus for ``cfg`` from the cache (built on first use); ConfigError when it is too small.

    ``tokenizer``: a pretrained model's own tokenizer instead of one trained on the corpus; ``cfg.tokenizer``
    then names it (``pretrained:<hash of its file>``) so that the cache is keyed by it."""
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
    if cfg.tokenizer not in ("bpe", "bytes") and tokenizer is None:
        raise ConfigError(f"data.tokenizer = {cfg.tokenizer!r}: choose from: bpe, bytes")
    cached = load_or_build(cfg, env, log, tokenizer)
    n_train, n_val = len(cached.train), len(cached.val)
    need_train = batch_size * (seq_len + 1)
    if n_train < need_train or n_val < seq_len + 1:
        raise ConfigError(
            f"data.corpus = {cfg.corpus!r}: corpus smaller than one batch: the train split has {n_train:,} "
            f"tokens (need batch_size * (seq_len + 1) = {batch_size} * {seq_len + 1} = {need_train:,}) and "
            f"the val split {n_val:,} (need seq_len + 1 = {seq_len + 1}); use a larger corpus, raise "
            "data.max_bytes, or lower train.batch_size / model.seq_len"
        )
    return TokenData(
        cached.train, cached.val, cached.tokenizer, cached.meta, cached.directory, cached.rebuilt, cfg.order,
        cached.counts,
    )
