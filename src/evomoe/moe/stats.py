"""Routing statistics as pure functions, for every router (LayerStats, metrics.jsonl, the report).

Legend: T tokens, E experts, P pairs, B sequences, S positions, C chunks. All sums stay tensors (no host
sync); the interval statistics add them up and divide at log time.
"""

from __future__ import annotations

import torch

from .losses import chunk_index, sequence_shape

CHUNK_LEN = 8  # chunk-level sparsity is measured over 8 consecutive tokens of a sequence (BlockFFN's CLS)


def experts_per_token(token_idx_P: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] number of experts each token was routed to."""
    return torch.bincount(token_idx_P, minlength=num_tokens)[:num_tokens]


def k_sums(k_T: torch.Tensor, valid_T=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of k, sum of k^2) over the valid tokens: the mean and the std of k over any number of steps."""
    k = k_T.double()
    if valid_T is not None:
        k = k * valid_T
    return k.sum(), (k * k).sum()


def chunk_empty_slots(
    token_idx_P, expert_idx_P, num_tokens: int, num_experts: int, shape=None, valid_T=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk, expert) slots in which no token of the chunk used the expert, and the number of slots
    (chunks of ``CHUNK_LEN`` tokens inside each sequence; chunks made only of padding are left out).
    Chunk-level sparsity = empty / slots: the share of experts an 8-token chunk never needs."""
    chunk_T, C = chunk_index(sequence_shape(shape, num_tokens), CHUNK_LEN, token_idx_P.device)
    used_CE = torch.zeros(C, num_experts, dtype=torch.bool, device=token_idx_P.device)
    used_CE[chunk_T[token_idx_P], expert_idx_P] = True
    if valid_T is None:
        live_C = torch.ones(C, dtype=torch.bool, device=token_idx_P.device)
    else:
        live_C = (
            torch.zeros(C, dtype=torch.long, device=token_idx_P.device).index_add(0, chunk_T, valid_T.long())
            > 0
        )
    slots = live_C.sum() * num_experts
    return slots - (used_CE & live_C.unsqueeze(1)).sum(), slots


def chunk_sparsity_reference(token_idx_P, expert_idx_P, shape, num_experts: int) -> float:
    """Loop twin: per chunk, the experts used by at least one of its tokens."""
    B, S = shape
    used: dict[int, set[int]] = {}
    for t, e in zip(token_idx_P.tolist(), expert_idx_P.tolist()):
        b, s = divmod(t, S)
        used.setdefault(b * 10**9 + s // CHUNK_LEN, set()).add(e)
    chunks = B * -(-S // CHUNK_LEN)
    return 1.0 - sum(len(v) for v in used.values()) / (chunks * num_experts)


def load_cv(counts_E: torch.Tensor) -> float:
    """Coefficient of variation of the pairs per expert (0: perfectly even)."""
    c = counts_E.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def dead_experts(counts_E: torch.Tensor) -> int:
    """Experts that received no token."""
    return int((counts_E == 0).sum())
