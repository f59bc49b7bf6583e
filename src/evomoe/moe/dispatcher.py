"""Dropless, index-based dispatch of routed pairs to experts and back.

Legend: T tokens, D width, E experts, P pairs. The dispatcher is swapped from outside to add
expert parallelism (``evomoe.parallel``); the MoE layer only calls ``dispatch`` / ``combine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.permute import (
    ScatterPlan,
    gather_rows_planned,
    inverse_permutation,
    scatter_plan,
    sort_by_expert,
    weighted_scatter_sum_rows,
)
from .router import Routing


@dataclass
class DispatchState:
    token_idx_P: torch.Tensor  # in expert-grouped order (padding rows: token 0)
    weight_P: torch.Tensor  # in expert-grouped order (padding rows: weight 0)
    num_tokens: int
    plan: ScatterPlan | None = None  # how the expert-grouped rows fold back into tokens
    counts_E: torch.Tensor | None = None  # real pairs per expert (the experts' counts may be padded)


def row_multiple(x_TD: torch.Tensor) -> int:
    """Each expert's row count is padded to this multiple (with zero rows, never read back).

    On CPU in bf16/fp16 every matmul goes to oneDNN, which JIT-compiles a kernel per shape: with a row
    count that changes every step, each expert's matmuls recompile (measured 3-4x slower than a cached
    shape). Multiples of 32 keep the number of distinct shapes small, so the kernels stay cached (a
    compiled bf16 Switch step of the default shape: 1.27-1.31x eager fp32's speed at 16, 1.37-1.39x at 32
    and 64, CPU time, docs/performance.md).
    """
    if x_TD.device.type != "cpu":
        return 1
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x_TD.dtype
    return 32 if dtype in (torch.bfloat16, torch.float16) else 1


@dataclass
class DispatchPlan:
    order_P: torch.Tensor  # pair behind each expert-grouped row
    counts_E: torch.Tensor  # real pairs per expert
    token_idx_P: torch.Tensor  # token of each expert-grouped row
    plan: ScatterPlan  # token order of the expert-grouped rows
    rows_E: torch.Tensor  # rows per expert as computed (counts_E rounded up to the row multiple)
    dest_P: torch.Tensor | None = None  # padded row of each expert-grouped pair (None: no padding)
    pad_rows: torch.Tensor | None = None  # the padding rows
    num_rows: int = 0


def plan_dispatch(routing: Routing, num_tokens: int, num_experts: int, multiple: int = 1) -> DispatchPlan:
    """Expert order of the pairs, counts per expert, and the token plan of the expert-grouped rows.

    Fixed k (``routing.fixed_k``: pair p is token p // k) needs no sort by token: the plan is the inverse
    of the expert order. Otherwise one stable sort by token. No host sync unless ``multiple`` > 1 (CPU).
    """
    with torch.no_grad():
        order_P, counts_E = sort_by_expert(routing.expert_idx_P, num_experts)
        token_idx_P = routing.token_idx_P.index_select(0, order_P)
        k = routing.fixed_k
        if k is not None and routing.token_idx_P.numel() == k * num_tokens:
            plan = ScatterPlan(inverse_permutation(order_P), None, k, num_tokens)
        else:
            plan = scatter_plan(token_idx_P, num_tokens)
        P = token_idx_P.numel()
        if multiple == 1 or P == 0:
            return DispatchPlan(order_P, counts_E, token_idx_P, plan, counts_E, num_rows=P)
        rows_E = (counts_E + multiple - 1) // multiple * multiple
        shift_E = (torch.cumsum(rows_E, 0) - rows_E) - (torch.cumsum(counts_E, 0) - counts_E)
        expert_P = torch.repeat_interleave(torch.arange(num_experts), counts_E, output_size=P)
        dest_P = torch.arange(P) + shift_E[expert_P]
        num_rows = int(rows_E.sum())
        is_pad = torch.ones(num_rows, dtype=torch.bool)
        is_pad[dest_P] = False
        pad_rows = is_pad.nonzero().squeeze(1)
        plan = ScatterPlan(dest_P.index_select(0, plan.order_S), plan.counts_T, plan.fixed_k, num_tokens)
        token_pad = token_idx_P.new_zeros(num_rows).index_copy_(0, dest_P, token_idx_P)
        return DispatchPlan(order_P, counts_E, token_pad, plan, rows_E, dest_P, pad_rows, num_rows)


class LocalDispatcher:
    """All experts on this device: sort pairs by expert, gather rows, and sum them back per token."""

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """-> rows grouped by expert, rows per expert (each a multiple of ``row_multiple``), the state."""
        d = plan_dispatch(routing, x_TD.shape[0], num_experts, row_multiple(x_TD))
        weight_P = routing.weight_P.index_select(0, d.order_P)
        if d.dest_P is not None:
            weight_P = weight_P.new_zeros(d.num_rows).index_copy(0, d.dest_P, weight_P)
        x_PD = gather_rows_planned(x_TD, d.token_idx_P, d.plan, d.pad_rows)
        return x_PD, d.rows_E, DispatchState(d.token_idx_P, weight_P, x_TD.shape[0], d.plan, d.counts_E)

    def combine(self, y_PD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """out_TD[t] = sum of weight * y over the pairs of token t (the weighting fused into the sum)."""
        plan = state.plan or scatter_plan(state.token_idx_P, state.num_tokens)
        return weighted_scatter_sum_rows(y_PD, state.weight_P, state.token_idx_P, plan)


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
