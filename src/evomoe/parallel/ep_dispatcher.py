"""The expert-parallel dispatcher: the drop-in replacement of ``moe.dispatcher.LocalDispatcher``.

Legend: T local tokens, D width, E global experts, L = E / ep local experts, P local pairs (grouped by global
expert), R rows received (source-rank major, local-expert minor), G the same rows grouped by local expert.
Rank j of the expert-parallel group owns global experts [j*L, (j+1)*L), so global id = j*L + local id.

Per MoE layer and step: (1) sort local pairs by global expert, (2) all-to-all the pair counts per expert
(E integers), (3) all-to-all the token rows (uneven splits), (4) regroup the received rows by local expert
and run the local experts, (5) undo (4) and all-to-all the results back, (6) weight and scatter-add as the
local dispatcher does. The backward runs (5) and (3) in reverse; the counts carry no gradient.
Because rows arrive in source-rank order and each rank holds a contiguous slice of the global batch, every
expert sees its rows in global token order, exactly as in the single-process run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moe.router import Routing
from ..ops.permute import gather_rows, scatter_add_rows, sort_by_expert
from .comm import CommStats, all_to_all_rows, exchange_counts


@dataclass
class EPDispatchState:
    token_idx_P: torch.Tensor  # local token of each sent pair, grouped by global expert
    weight_P: torch.Tensor
    num_tokens: int
    order_G: torch.Tensor  # received row behind each expert-grouped row
    send_splits: list[int]  # rows sent to each rank of the group
    recv_splits: list[int]  # rows received from each rank of the group
    stats: CommStats | None = None


class EPDispatcher:
    """Experts sharded over an expert-parallel process group of ``group_size`` ranks."""

    def __init__(
        self, num_global_experts: int, group, group_rank: int, group_size: int, stats: CommStats
    ) -> None:
        if num_global_experts % group_size:
            raise ValueError(f"parallel.ep = {group_size} must divide moe.num_experts = {num_global_experts}")
        self.num_global_experts = num_global_experts
        self.num_local_experts = num_global_experts // group_size
        self.group, self.group_rank, self.group_size, self.stats = group, group_rank, group_size, stats

    @property
    def first_expert(self) -> int:
        """Global id of this rank's local expert 0."""
        return self.group_rank * self.num_local_experts

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, EPDispatchState]:
        """-> rows for the local experts (grouped by local expert), their counts [L], state for combine."""
        if num_experts != self.num_global_experts:
            raise ValueError(
                f"routing over {num_experts} experts, but this dispatcher shards {self.num_global_experts}"
            )
        n, L = self.group_size, self.num_local_experts
        order_P, counts_E = sort_by_expert(routing.expert_idx_P, num_experts)
        token_idx_P = routing.token_idx_P.index_select(0, order_P)
        weight_P = routing.weight_P.index_select(0, order_P)
        x_PD = gather_rows(x_TD, token_idx_P)
        recv_SL = exchange_counts(counts_E, self.group).view(n, L)  # rows for local expert l from rank s
        splits = torch.cat([counts_E.view(n, L).sum(1), recv_SL.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = splits[:n], splits[n:]
        stats = self.stats if torch.is_grad_enabled() else None  # count training steps, not evaluation
        x_RD = all_to_all_rows(x_PD, recv_splits, send_splits, self.group, stats)
        local_L = torch.arange(L, device=recv_SL.device).repeat(n)
        expert_R = torch.repeat_interleave(local_L, recv_SL.reshape(-1), output_size=x_RD.shape[0])
        order_G = torch.argsort(expert_R, stable=True)
        x_GD = x_RD.index_select(0, order_G)
        state = EPDispatchState(
            token_idx_P, weight_P, x_TD.shape[0], order_G, send_splits, recv_splits, stats
        )
        return x_GD, recv_SL.sum(0), state

    def combine(self, y_GD: torch.Tensor, state: EPDispatchState) -> torch.Tensor:
        """Results back to the ranks that sent the rows, then ``sum_e w[t, e] * y`` per local token."""
        inverse_R = torch.empty_like(state.order_G)
        inverse_R[state.order_G] = torch.arange(state.order_G.numel(), device=state.order_G.device)
        y_RD = y_GD.index_select(0, inverse_R)
        y_PD = all_to_all_rows(y_RD, state.send_splits, state.recv_splits, self.group, state.stats)
        y_PD = y_PD * state.weight_P.unsqueeze(1).to(y_PD.dtype)
        return scatter_add_rows(y_PD, state.token_idx_P, state.num_tokens)
