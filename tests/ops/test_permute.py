"""Index-based gather / scatter against their per-row references; the stable sort by expert."""

from __future__ import annotations

import pytest
import torch

from evomoe.ops.permute import (
    gather_rows,
    gather_rows_reference,
    scatter_add_rows,
    scatter_add_rows_reference,
    sort_by_expert,
)


def _case(T: int, P: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g)
    token_idx_P = torch.randint(0, T, (P,), generator=g) if T else torch.zeros(0, dtype=torch.long)
    return x_TD, token_idx_P


@pytest.mark.parametrize("T,P,D", [(7, 13, 4), (5, 0, 3), (1, 6, 2), (11, 3, 8), (0, 0, 4)])
def test_gather_matches_reference(T, P, D):
    x_TD, token_idx_P = _case(T, P, D, seed=T + P)
    x1 = x_TD.clone().requires_grad_(True)
    x2 = x_TD.clone().requires_grad_(True)
    y1, y2 = gather_rows(x1, token_idx_P), gather_rows_reference(x2, token_idx_P)
    assert y1.shape == (P, D)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    if P:
        g_PD = torch.randn(P, D)
        (y1 * g_PD).sum().backward()
        (y2 * g_PD).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T,P,D", [(7, 13, 4), (5, 0, 3), (1, 6, 2), (11, 3, 8), (0, 0, 4)])
def test_scatter_add_matches_reference(T, P, D):
    g = torch.Generator().manual_seed(7 * T + P)
    y_PD = torch.randn(P, D, generator=g)
    token_idx_P = torch.randint(0, max(T, 1), (P,), generator=g)
    y1 = y_PD.clone().requires_grad_(True)
    y2 = y_PD.clone().requires_grad_(True)
    o1, o2 = scatter_add_rows(y1, token_idx_P, T), scatter_add_rows_reference(y2, token_idx_P, T)
    assert o1.shape == (T, D)
    torch.testing.assert_close(o1, o2, atol=1e-6, rtol=0)
    if P and T:
        g_TD = torch.randn(T, D, generator=g)
        (o1 * g_TD).sum().backward()
        (o2 * g_TD).sum().backward()
        torch.testing.assert_close(y1.grad, y2.grad, atol=1e-6, rtol=0)


def test_scatter_leaves_unrouted_tokens_exactly_zero():
    y_PD = torch.randn(4, 3)
    out = scatter_add_rows(y_PD, torch.tensor([0, 2, 2, 0]), 5)
    assert torch.equal(out[[1, 3, 4]], torch.zeros(3, 3))
    torch.testing.assert_close(out[2], y_PD[1] + y_PD[2])


def test_gather_then_scatter_is_count_weighted_identity():
    x_TD, token_idx_P = _case(9, 30, 5, seed=3)
    out = scatter_add_rows(gather_rows(x_TD, token_idx_P), token_idx_P, 9)
    counts_T = torch.bincount(token_idx_P, minlength=9).unsqueeze(1).float()
    torch.testing.assert_close(out, x_TD * counts_T)


@pytest.mark.parametrize("seed", range(5))
def test_sort_by_expert_stable_and_counts(seed):
    g = torch.Generator().manual_seed(seed)
    E = 1 + seed
    P = 40
    expert_idx_P = torch.randint(0, E, (P,), generator=g)
    order_P, counts_E = sort_by_expert(expert_idx_P, E + 2)  # two trailing experts get nothing
    assert counts_E.shape == (E + 2,)
    assert counts_E.tolist() == [int((expert_idx_P == e).sum()) for e in range(E + 2)]
    assert sorted(order_P.tolist()) == list(range(P))  # a permutation
    expected = sorted(range(P), key=lambda p: (int(expert_idx_P[p]), p))  # stable: pair order kept
    assert order_P.tolist() == expected


def test_sort_by_expert_empty():
    order_P, counts_E = sort_by_expert(torch.zeros(0, dtype=torch.long), 4)
    assert order_P.numel() == 0
    assert counts_E.tolist() == [0, 0, 0, 0]


def test_sort_by_expert_many_ties_is_stable():
    """Long runs of equal keys (argsort without ``stable`` may shuffle them)."""
    expert_idx_P = torch.tensor([1, 0] * 500 + [2] * 300)
    order_P, counts_E = sort_by_expert(expert_idx_P, 3)
    assert counts_E.tolist() == [500, 500, 300]
    assert order_P[:500].tolist() == list(range(1, 1000, 2))
    assert order_P[500:1000].tolist() == list(range(0, 1000, 2))
    assert order_P[1000:].tolist() == list(range(1000, 1300))
