"""Length-bucketed batches of variable-length sequence pairs, as a pure function of (seed, step).

Pairs are grouped into buckets of similar length (by the longer side), so a batch wastes little on
padding. A training step draws from ``np.random.default_rng([seed, step])`` a bucket (weighted by its
size) and ``batch_size`` pairs of it; the step counter is therefore the whole data position and a
resumed run sees the same batches. Validation batches are a fixed list: pairs sorted by length, in order.

Legend: B batch, S source length, T target length (with ``<s>`` / ``</s>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PairBatch:
    """Padded source, decoder input and target ids, their padding masks, and the pair indices."""

    src_BS: torch.Tensor
    src_valid_BS: torch.Tensor
    tgt_in_BT: torch.Tensor  # <s> y_1 .. y_n
    tgt_out_BT: torch.Tensor  # y_1 .. y_n </s>
    tgt_valid_BT: torch.Tensor
    index_B: np.ndarray  # which pairs (indices into the split)


def make_buckets(lengths: np.ndarray, n_buckets: int) -> list[np.ndarray]:
    """Split the items (by ascending length, ties by index) into up to ``n_buckets`` equal-count buckets."""
    order = np.argsort(lengths, kind="stable")
    parts = np.array_split(order, max(1, min(n_buckets, len(order))))
    return [np.sort(p) for p in parts if len(p)]


def sample_indices(buckets: list[np.ndarray], seed: int, step: int, batch_size: int) -> np.ndarray:
    """The pair indices of training step ``step``: one bucket, ``batch_size`` pairs drawn with replacement."""
    if step < 0 or seed < 0:
        raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0")
    rng = np.random.default_rng([seed, step])
    sizes = np.array([len(b) for b in buckets], dtype=np.float64)
    bucket = buckets[int(rng.choice(len(buckets), p=sizes / sizes.sum()))]
    return bucket[rng.integers(0, len(bucket), size=batch_size)]


def pad(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, max_len] and the valid mask (True on real tokens)."""
    n = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        valid[i, : len(s)] = True
    return ids, valid


def pair_batch(
    src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], index_B: np.ndarray, pad_id: int, bos: int, eos: int
) -> PairBatch:
    """Pad the chosen pairs; the decoder reads ``<s> y`` and predicts ``y </s>`` (teacher forcing)."""
    s_ids, s_valid = pad([src[i] for i in index_B], pad_id)
    t_in, t_valid = pad([np.concatenate([[bos], tgt[i]]) for i in index_B], pad_id)
    t_out, _ = pad([np.concatenate([tgt[i], [eos]]) for i in index_B], pad_id)
    return PairBatch(s_ids, s_valid, t_in, t_out, t_valid, np.asarray(index_B))


def fixed_batches(lengths: np.ndarray, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """Validation: the first ``max_batches * batch_size`` pairs, batched after sorting them by length."""
    keep = np.arange(min(len(lengths), max_batches * batch_size))
    keep = keep[np.argsort(lengths[keep], kind="stable")]
    return [keep[i : i + batch_size] for i in range(0, len(keep), batch_size)]
