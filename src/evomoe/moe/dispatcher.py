"""Dropless, index-based dispatch of routed pairs to experts and back.

Legend: T tokens, D width, E experts, P pairs. The dispatcher is swapped from outside to add
expert parallelism (``evomoe.parallel``); the MoE layer only calls ``dispatch`` / ``combine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.permute import gather_rows, scatter_add_rows, sort_by_expert
from .routing import Routing


@dataclass
class DispatchState:
    token_idx_P: torch.Tensor  # in expert-grouped order
    weight_P: torch.Tensor  # in expert-grouped order
    num_tokens: int


class LocalDispatcher:
    """All experts on this device: sort pairs by expert, gather rows, and scatter-add them back."""

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        order_P, counts_E = sort_by_expert(routing.expert_idx_P, num_experts)
        token_idx_P = routing.token_idx_P.index_select(0, order_P)
        weight_P = routing.weight_P.index_select(0, order_P)
        x_PD = gather_rows(x_TD, token_idx_P)
        return x_PD, counts_E, DispatchState(token_idx_P, weight_P, x_TD.shape[0])

    def combine(self, y_PD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        y_PD = y_PD * state.weight_P.unsqueeze(1).to(y_PD.dtype)
        return scatter_add_rows(y_PD, state.token_idx_P, state.num_tokens)


def moe_reference(x_TD: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
    """Slow twin of dispatch -> experts -> combine: every pair computed on its own."""
    out_TD = torch.zeros_like(x_TD)
    pairs = zip(routing.token_idx_P.tolist(), routing.expert_idx_P.tolist(), routing.weight_P.unbind(0))
    for t, e, w in pairs:
        counts = torch.zeros(experts.num_experts, dtype=torch.long)
        counts[e] = 1
        y = experts(x_TD[t : t + 1], counts, impl="loop")
        out_TD = out_TD.index_add(0, torch.tensor([t]), w * y)
    return out_TD
