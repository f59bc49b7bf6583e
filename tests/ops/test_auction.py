"""Balanced assignment: the auction against the exact Hungarian twin, exact balance, capacities, the cap."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomoe.ops.auction import (
    assignment_score,
    balanced_assignment,
    balanced_assignment_reference,
    balanced_capacities,
)


def brute_force_best(scores_TE: torch.Tensor, cap_E: torch.Tensor) -> float:
    """Best total over every distinct assignment with the given loads (tiny T only)."""
    T, E = scores_TE.shape
    slots = [e for e in range(E) for _ in range(int(cap_E[e]))]
    best = -float("inf")
    for perm in set(itertools.permutations(slots)):
        best = max(best, sum(float(scores_TE[t, e]) for t, e in enumerate(perm)))
    return best


def loads(expert_T: torch.Tensor, E: int) -> list[int]:
    return torch.bincount(expert_T, minlength=E).tolist()


def test_capacities_split_the_remainder_over_the_first_experts():
    assert balanced_capacities(12, 4).tolist() == [3, 3, 3, 3]
    assert balanced_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert balanced_capacities(3, 5).tolist() == [1, 1, 1, 0, 0]
    assert balanced_capacities(0, 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("seed", range(6))
def test_reference_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    T, E = 6, [2, 3, 4][seed % 3]
    scores = torch.randn(T, E, generator=g)
    cap = balanced_capacities(T, E)
    ref = balanced_assignment_reference(scores)
    assert loads(ref, E) == cap.tolist()
    assert assignment_score(scores, ref) == pytest.approx(brute_force_best(scores, cap), abs=1e-6)


@pytest.mark.parametrize("seed", range(40))
def test_auction_matches_exact_solver(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 30, (1,), generator=g))
    E = int(torch.randint(2, 7, (1,), generator=g))
    scores = torch.randn(T, E, generator=g)
    if seed % 4 == 0:
        scores = scores.round()  # many ties
    if seed % 4 == 1:
        scores[:, 0] += 3.0  # every token prefers expert 0
    eps = 1e-3
    got = balanced_assignment(scores, eps=eps, eps_scaling=4.0 if seed % 2 else 0.0)
    ref = balanced_assignment_reference(scores)
    assert loads(got, E) == balanced_capacities(T, E).tolist()
    best = assignment_score(scores, ref)
    assert best - eps * T - 1e-4 <= assignment_score(scores, got) <= best + 1e-4


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 14),
    E=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_auction_property(T, E, seed):
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2
    eps = 1e-3
    got = balanced_assignment(scores, eps=eps)
    assert loads(got, E) == balanced_capacities(T, E).tolist()
    best = assignment_score(scores, balanced_assignment_reference(scores))
    assert assignment_score(scores, got) >= best - eps * T - 1e-4


def test_exact_balance_when_experts_divide_tokens():
    g = torch.Generator().manual_seed(0)
    T, E = 1024, 8
    scores = torch.randn(T, E, generator=g)
    scores[:, 3] += 4.0  # a strongly preferred expert still gets exactly T / E tokens
    got = balanced_assignment(scores)
    assert loads(got, E) == [T // E] * E
    greedy = scores.argmax(1)
    assert loads(greedy, E)[3] > T // 2  # the problem is really unbalanced without the auction
    assert assignment_score(scores, got) <= assignment_score(scores, greedy) + 1e-3


def test_non_divisible_tokens_fill_the_first_experts_first():
    scores = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    assert loads(balanced_assignment(scores), 4) == [3, 3, 2, 2]
    few = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    assert loads(balanced_assignment(few), 5) == [1, 1, 1, 0, 0]


def test_custom_capacities_and_their_validation():
    scores = torch.randn(9, 3, generator=torch.Generator().manual_seed(3))
    cap = torch.tensor([5, 0, 4])
    got = balanced_assignment(scores, cap)
    assert loads(got, 3) == [5, 0, 4]
    best = assignment_score(scores, balanced_assignment_reference(scores, cap))
    assert assignment_score(scores, got) >= best - 9 * 1e-2
    with pytest.raises(ValueError, match="sum to T"):
        balanced_assignment(scores, torch.tensor([1, 1, 1]))


def test_iteration_cap_falls_back_to_greedy_fill_with_exact_balance():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(256, 8, generator=g)
    scores[:, 0] += 2.0
    for iters in (1, 3):
        got = balanced_assignment(scores, max_iters=iters)
        assert bool((got >= 0).all())
        assert loads(got, 8) == [32] * 8
    full = balanced_assignment(scores, max_iters=10_000)
    assert assignment_score(scores, balanced_assignment(scores, max_iters=1)) <= assignment_score(
        scores, full
    )


def test_edge_cases_and_no_grad():
    assert balanced_assignment(torch.zeros(0, 4)).numel() == 0
    assert balanced_assignment(torch.randn(5, 1)).tolist() == [0] * 5
    scores = torch.randn(8, 4, requires_grad=True)
    got = balanced_assignment(scores)
    assert got.dtype == torch.long and not got.requires_grad
    equal = torch.zeros(12, 3)  # every assignment is optimal: still balanced
    assert loads(balanced_assignment(equal), 3) == [4, 4, 4]
    assert loads(balanced_assignment(torch.randn(12, 3, dtype=torch.float64)), 3) == [4, 4, 4]
