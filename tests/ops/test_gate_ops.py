"""Pure ops of the gates: Sinkhorn and Hungarian hardening, statistical top-k, smooth-step selectors."""

from __future__ import annotations

import itertools

import pytest
import torch

from evomoe.ops.sinkhorn import (
    harden_permutation,
    harden_permutation_reference,
    permutation_matrix,
    sinkhorn,
    sinkhorn_reference,
)
from evomoe.ops.smooth_step import (
    selector_probs,
    selector_probs_reference,
    smooth_step,
    tree_reach_probs,
    tree_reach_probs_reference,
)
from evomoe.ops.stat_topk import stat_topk_mask, stat_topk_reference


def test_sinkhorn_doubly_stochastic_and_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 5)
    p = sinkhorn(logits, 200)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(p, sinkhorn_reference(logits, 200), atol=1e-5, rtol=1e-4)


def test_sinkhorn_stable_at_tiny_temperature():
    torch.manual_seed(1)
    p = sinkhorn(torch.randn(1, 6, 6) / 1e-7, 150)  # COMET's last temperature and iteration count
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-2), torch.ones(1, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 6), atol=1e-2, rtol=0)  # slow to converge there
    torch.testing.assert_close(p, permutation_matrix(harden_permutation(p)), atol=1e-2, rtol=0)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_hardening_gives_the_best_permutation(n):
    torch.manual_seed(n)
    p = sinkhorn(torch.randn(2, n, n), 50)
    perm = harden_permutation(p)
    for row in perm.tolist():
        assert sorted(row) == list(range(n))  # a permutation
    torch.testing.assert_close(perm, harden_permutation_reference(p))
    m = permutation_matrix(perm)
    assert torch.equal(m.sum(-1), torch.ones(2, n)) and torch.equal(m.sum(-2), torch.ones(2, n))


def test_stat_topk_keeps_target_fraction_on_gaussian_input():
    torch.manual_seed(0)
    x = torch.randn(64, 4096)
    for frac in (0.05, 0.1, 0.3):
        kept = stat_topk_mask(x, frac * 4096).float().mean().item()
        assert abs(kept - frac) < 0.01, (frac, kept)


def test_stat_topk_matches_reference_and_min_keep():
    torch.manual_seed(2)
    x = torch.randn(20, 8)
    assert torch.equal(stat_topk_mask(x, 2), stat_topk_reference(x, 2))
    flat = torch.zeros(3, 8)  # std 0: nothing passes the threshold, min_keep keeps the first maximum
    assert stat_topk_mask(flat, 2).sum() == 0
    assert torch.equal(stat_topk_mask(flat, 2, min_keep=1).sum(-1), torch.ones(3, dtype=torch.long))
    assert stat_topk_mask(flat, 2, min_keep=1)[:, 0].all()


@pytest.mark.parametrize("min_keep", [1, 2, 3])
def test_stat_topk_min_keep_breaks_ties_by_the_lowest_index(min_keep):
    """Rows full of ties (torch.topk returns any of the tied indices): min_keep keeps the first ones, as
    the reference does; the issue's row [0] * 15 + [-10] keeps expert 0."""
    row = torch.tensor([[0.0] * 15 + [-10.0]])
    assert stat_topk_mask(row, 2, min_keep=1)[0].nonzero().flatten().tolist() == [0]
    x = torch.randint(0, 3, (500, 16), generator=torch.Generator().manual_seed(min_keep)).float()
    assert torch.equal(stat_topk_mask(x, 2, min_keep), stat_topk_reference(x, 2, min_keep))


def test_smooth_step_ends_and_middle():
    t = torch.tensor([-1.0, -0.05, 0.0, 0.05, 1.0])
    s = smooth_step(t, 0.1)
    torch.testing.assert_close(s, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert (smooth_step(torch.linspace(-0.2, 0.2, 41), 0.1).diff() >= 0).all()


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_selector_and_tree_probs_match_references_and_sum_to_one(bits):
    torch.manual_seed(bits)
    s = torch.rand(3, 2, bits)
    r = selector_probs(s)
    torch.testing.assert_close(r, selector_probs_reference(s))
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 2))
    nodes = torch.rand(3, 2, 2**bits - 1)
    reach = tree_reach_probs(nodes)
    torch.testing.assert_close(reach, tree_reach_probs_reference(nodes))
    torch.testing.assert_close(reach.sum(-1), torch.ones(3, 2))


def test_binary_selectors_pick_one_code():
    for code in itertools.product([0.0, 1.0], repeat=3):
        r = selector_probs(torch.tensor(code).view(1, 1, 3))
        assert int((r > 0).sum()) == 1
