"""Sinkhorn normalisation of a learned log-matrix and its hardening into a permutation (COMET+).

Legend: N = n experts (the matrices are N x N), G = number of matrices (1, or k trees).
``sinkhorn`` works in log space (stable at the tiny temperatures COMET anneals to); ``sinkhorn_reference``
is the textbook alternation of row and column divisions in probability space, for tests.
``harden_permutation`` is the Hungarian algorithm (scipy); ``harden_permutation_reference`` tries every
permutation (tiny N only).
"""

from __future__ import annotations

import itertools

import torch


def sinkhorn(log_alpha_GNN: torch.Tensor, iters: int) -> torch.Tensor:
    """exp of ``iters`` alternating row / column log-normalisations -> [G, N, N], close to doubly stochastic.

    In float64: at tau = 1e-7 the scaled logits reach 1e7, where float32 rounds the normalisers by ~1.
    """
    x = log_alpha_GNN.double()
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x.exp().to(log_alpha_GNN.dtype)


def sinkhorn_reference(log_alpha_GNN: torch.Tensor, iters: int) -> torch.Tensor:
    """The same in probability space, one matrix and one row at a time (only for moderate logits)."""
    out = []
    for m in log_alpha_GNN.double():
        p = (m - m.max()).exp()
        for _ in range(iters):
            p = torch.stack([row / row.sum() for row in p])
            p = torch.stack([col / col.sum() for col in p.t()]).t()
        out.append(p)
    return torch.stack(out).to(log_alpha_GNN.dtype)


def harden_permutation(p_GNN: torch.Tensor) -> torch.Tensor:
    """[G, N] long: for each matrix, the permutation (row i -> column perm[i]) of largest total mass."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 - only needed once per run

    rows = []
    for m in p_GNN.detach().double().cpu().numpy():
        _, cols = linear_sum_assignment(-m)
        rows.append(torch.as_tensor(cols, dtype=torch.long))
    return torch.stack(rows).to(p_GNN.device)


def harden_permutation_reference(p_GNN: torch.Tensor) -> torch.Tensor:
    """Brute force over all N! permutations (N <= 7)."""
    rows = []
    for m in p_GNN.detach().double().cpu():
        n = m.shape[0]
        best = max(itertools.permutations(range(n)), key=lambda perm: float(m[range(n), list(perm)].sum()))
        rows.append(torch.tensor(best, dtype=torch.long))
    return torch.stack(rows).to(p_GNN.device)


def permutation_matrix(perm_GN: torch.Tensor) -> torch.Tensor:
    """[G, N, N] 0/1 matrices with a one at (i, perm[i])."""
    G, N = perm_GN.shape
    eye = torch.zeros(G, N, N, device=perm_GN.device)
    return eye.scatter_(2, perm_GN.unsqueeze(-1), 1.0)
