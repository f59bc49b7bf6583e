"""Index-based dispatch: group routed rows by expert and scatter them back.

Legend: T tokens, D width, E experts, P routed (token, expert) pairs, S the same pairs grouped by token.
Memory is O(P*D), never O(T^2).

A gather ``x_PD = x_TD[token_P]`` and its adjoint, the scatter-sum
``out_TD[t] = sum_{p: token_P[p] = t} y_PD[p]``, come with a ``ScatterPlan``: the pairs in token order.
When every token has exactly ``k`` pairs in token-major order (top-k routers) the fold needs no sort:
k = 1 is one row permutation (a gather by the inverse expert order), and on CUDA any fixed k is a gather
and a reshape-sum (deterministic, no atomics); variable k on CUDA is an ``index_add``. On CPU, for k != 1
and variable k, ``index_add`` of the rows is the fastest measured form (no gathered copy to allocate;
docs/performance.md) and is used unless the rows include padding (then the plan's gather + segment sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScatterPlan:
    """How P rows fold into T tokens: row ``order_S[s]`` is the s-th row in token order (None: already in
    token order); token t owns ``counts_T[t]`` consecutive rows of that order, or exactly ``fixed_k``."""

    order_S: torch.Tensor | None
    counts_T: torch.Tensor | None
    fixed_k: int | None
    num_tokens: int


def count_per_bin(idx_N: torch.Tensor, bins: int) -> torch.Tensor:
    """``bincount`` with a fixed length and no host sync (CUDA's bincount reads the max on the host)."""
    if idx_N.device.type == "cpu":
        return torch.bincount(idx_N, minlength=bins)
    counts = torch.zeros(bins, dtype=torch.long, device=idx_N.device)
    return counts.scatter_add_(0, idx_N, torch.ones_like(idx_N))


def inverse_permutation(perm_P: torch.Tensor) -> torch.Tensor:
    inv_P = torch.empty_like(perm_P)
    inv_P[perm_P] = torch.arange(perm_P.numel(), device=perm_P.device)
    return inv_P


def scatter_plan(token_idx_P: torch.Tensor, num_tokens: int) -> ScatterPlan:
    """The plan of any token index (a stable sort by token: the summation order of a scatter-add)."""
    order_S = torch.argsort(token_idx_P, stable=True)
    return ScatterPlan(order_S, count_per_bin(token_idx_P, num_tokens), None, num_tokens)


def segment_sum(a_SD: torch.Tensor, plan: ScatterPlan) -> torch.Tensor:
    """Sum consecutive rows of ``a_SD`` (already in token order) per token -> [T, D]."""
    T, D = plan.num_tokens, a_SD.shape[1]
    k = plan.fixed_k
    if k is not None:
        if k == 1:
            return a_SD.reshape(T, D)
        a_TKD = a_SD.reshape(T, k, D)
        if k == 2:
            return a_TKD[:, 0] + a_TKD[:, 1]
        return a_TKD.sum(1)
    if a_SD.shape[0] == 0 or T == 0:
        return a_SD.new_zeros(T, D)
    if a_SD.device.type == "cpu":
        return torch.segment_reduce(a_SD, "sum", lengths=plan.counts_T, axis=0)
    token_S = torch.repeat_interleave(
        torch.arange(T, device=a_SD.device), plan.counts_T, output_size=a_SD.shape[0]
    )
    return a_SD.new_zeros(T, D).index_add_(0, token_S, a_SD)


def _index_add_ok(y_PD: torch.Tensor, plan: ScatterPlan) -> bool:
    """CPU, not a pure permutation (k = 1), and every row real (no padding rows outside the plan)."""
    rows = y_PD.shape[0] if plan.order_S is None else plan.order_S.numel()
    return y_PD.device.type == "cpu" and plan.fixed_k != 1 and rows == y_PD.shape[0]


def scatter_sum(
    y_PD: torch.Tensor, plan: ScatterPlan, token_idx_P: torch.Tensor | None = None
) -> torch.Tensor:
    """out_TD[t] = sum of the rows of token t (no autograd of its own; see ``scatter_sum_rows``).
    ``token_idx_P``: the token of each row, for the CPU ``index_add`` form."""
    if token_idx_P is not None and _index_add_ok(y_PD, plan):
        return y_PD.new_zeros(plan.num_tokens, y_PD.shape[1]).index_add_(0, token_idx_P, y_PD)
    if plan.order_S is None:
        out_TD = segment_sum(y_PD, plan)
        return out_TD.clone() if plan.fixed_k == 1 else out_TD  # never a view of the input
    return segment_sum(y_PD.index_select(0, plan.order_S), plan)


class _GatherRows(torch.autograd.Function):
    """x_PD = x_TD[token_P] (``zero_rows``: rows set to zero instead, outside the plan); backward: the
    planned scatter-sum (the plan is built on demand)."""

    @staticmethod
    def forward(ctx, x_TD, token_idx_P, plan, zero_rows):  # noqa: D102
        ctx.save_for_backward(token_idx_P)
        ctx.plan, ctx.num_tokens = plan, x_TD.shape[0]
        x_PD = x_TD.index_select(0, token_idx_P)
        return x_PD if zero_rows is None else x_PD.index_fill_(0, zero_rows, 0)

    @staticmethod
    def backward(ctx, g_PD):  # noqa: D102
        (token_idx_P,) = ctx.saved_tensors
        plan = ctx.plan or scatter_plan(token_idx_P, ctx.num_tokens)
        return scatter_sum(g_PD, plan, token_idx_P), None, None, None


class _ScatterSumRows(torch.autograd.Function):
    """out_TD = planned scatter-sum of y_PD; backward: the gather g_TD[token_P]."""

    @staticmethod
    def forward(ctx, y_PD, token_idx_P, plan):  # noqa: D102
        ctx.save_for_backward(token_idx_P)
        return scatter_sum(y_PD, plan, token_idx_P)

    @staticmethod
    def backward(ctx, g_TD):  # noqa: D102
        (token_idx_P,) = ctx.saved_tensors
        return g_TD.index_select(0, token_idx_P), None, None


class _WeightedScatterSumRows(torch.autograd.Function):
    """out_TD[t] = sum_p w_P[p] * y_PD[p] over the rows p of token t, in one pass and two allocations.

    The twin of ``scatter_sum_rows(y_PD * w_P[:, None], ...)`` (what autograd would save and allocate:
    the weighted copy, its gradient and the row products); backward: one gather of g_TD, one row dot.
    """

    @staticmethod
    def forward(ctx, y_PD, weight_P, token_idx_P, plan):  # noqa: D102
        w_P = weight_P.to(y_PD.dtype)
        ctx.save_for_backward(y_PD, w_P, token_idx_P)
        ctx.weight_dtype = weight_P.dtype
        if _index_add_ok(y_PD, plan):
            a_PD = y_PD * w_P.unsqueeze(1)
            return a_PD.new_zeros(plan.num_tokens, a_PD.shape[1]).index_add_(0, token_idx_P, a_PD)
        if plan.order_S is None:
            a_SD, w_S = y_PD.clone(), w_P
        else:
            a_SD, w_S = y_PD.index_select(0, plan.order_S), w_P.index_select(0, plan.order_S)
        a_SD.mul_(w_S.unsqueeze(1))
        return segment_sum(a_SD, plan)

    @staticmethod
    def backward(ctx, g_TD):  # noqa: D102
        y_PD, w_P, token_idx_P = ctx.saved_tensors
        g_PD = g_TD.index_select(0, token_idx_P)
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = torch.linalg.vecdot(g_PD, y_PD).to(ctx.weight_dtype)
        g_y = g_PD.mul_(w_P.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return g_y, g_w, None, None


def weighted_scatter_sum_rows(
    y_PD: torch.Tensor, weight_P: torch.Tensor, token_idx_P: torch.Tensor, plan: ScatterPlan
) -> torch.Tensor:
    """out_TD[t] = sum over the rows p of token t of weight_P[p] * y_PD[p] (computed in y's dtype)."""
    return _WeightedScatterSumRows.apply(y_PD, weight_P, token_idx_P, plan)


def gather_rows_planned(
    x_TD: torch.Tensor,
    token_idx_P: torch.Tensor,
    plan: ScatterPlan | None,
    zero_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gather_rows`` whose backward uses a precomputed plan of ``token_idx_P``; ``zero_rows`` are padding
    rows set to zero (the plan must not reference them)."""
    return _GatherRows.apply(x_TD, token_idx_P, plan, zero_rows)


def scatter_sum_rows(y_PD: torch.Tensor, token_idx_P: torch.Tensor, plan: ScatterPlan) -> torch.Tensor:
    """``scatter_add_rows`` with a precomputed plan of ``token_idx_P``."""
    return _ScatterSumRows.apply(y_PD, token_idx_P, plan)


# ------------------------------------------------------------------------------------------ the API
def sort_by_expert(expert_idx_P: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that groups pairs by expert, and the pair count of each expert (no host sync)."""
    order_P = torch.argsort(expert_idx_P, stable=True)
    return order_P, count_per_bin(expert_idx_P, num_experts)


def gather_rows(x_TD: torch.Tensor, token_idx_P: torch.Tensor) -> torch.Tensor:
    """x_PD[p] = x_TD[token_idx_P[p]]; the backward is a scatter-sum into x_TD (segment sum, no atomics)."""
    return _GatherRows.apply(x_TD, token_idx_P, None, None)


def scatter_add_rows(y_PD: torch.Tensor, token_idx_P: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out_TD[t] = sum of y_PD[p] over pairs p of token t; tokens with no pair get zeros."""
    return _ScatterSumRows.apply(y_PD, token_idx_P, scatter_plan(token_idx_P, num_tokens))


def gather_rows_reference(x_TD: torch.Tensor, token_idx_P: torch.Tensor) -> torch.Tensor:
    rows = [x_TD[int(t)] for t in token_idx_P]
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def scatter_add_rows_reference(
    y_PD: torch.Tensor, token_idx_P: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    out = [y_PD.new_zeros(y_PD.shape[1]) for _ in range(num_tokens)]
    for p, t in enumerate(token_idx_P.tolist()):
        out[t] = out[t] + y_PD[p]
    return torch.stack(out) if out else y_PD.new_zeros(0, y_PD.shape[1])
