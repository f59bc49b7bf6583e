"""Index-based dispatch: group routed rows by expert and scatter them back.

Legend: T tokens, D width, E experts, P routed (token, expert) pairs. Memory is O(P*D), never O(T^2).
"""

from __future__ import annotations

import torch


def sort_by_expert(expert_idx_P: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that groups pairs by expert, and the pair count of each expert (no host sync)."""
    order_P = torch.argsort(expert_idx_P, stable=True)
    counts_E = torch.bincount(expert_idx_P, minlength=num_experts)
    return order_P, counts_E


def gather_rows(x_TD: torch.Tensor, token_idx_P: torch.Tensor) -> torch.Tensor:
    """x_PD[p] = x_TD[token_idx_P[p]]; the backward is a scatter-add into x_TD."""
    return x_TD.index_select(0, token_idx_P)


def scatter_add_rows(y_PD: torch.Tensor, token_idx_P: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out_TD[t] = sum of y_PD[p] over pairs p of token t; tokens with no pair get zeros."""
    out_TD = y_PD.new_zeros(num_tokens, y_PD.shape[1])
    return out_TD.index_add(0, token_idx_P, y_PD)


def gather_rows_reference(x_TD: torch.Tensor, token_idx_P: torch.Tensor) -> torch.Tensor:
    rows = [x_TD[int(t)] for t in token_idx_P]
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def scatter_add_rows_reference(y_PD: torch.Tensor, token_idx_P: torch.Tensor, num_tokens: int) -> torch.Tensor:
    out = [y_PD.new_zeros(y_PD.shape[1]) for _ in range(num_tokens)]
    for p, t in enumerate(token_idx_P.tolist()):
        out[t] = out[t] + y_PD[p]
    return torch.stack(out) if out else y_PD.new_zeros(0, y_PD.shape[1])
