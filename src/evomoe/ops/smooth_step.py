"""Smooth-step gates (DSelect-k, COMET): differentiable selectors that become exactly binary.

S(t) = 0 for t <= -gamma/2, 1 for t >= gamma/2, else -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2.
Legend: T tokens, K selectors (or trees), M = ceil(log2 E) bits (tree depth), C = 2^M codes (leaves),
V = C - 1 internal nodes per tree in heap order (root 0, children of v: 2v+1 left, 2v+2 right).
"""

from __future__ import annotations

import math

import torch


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    inner = -2.0 * t**3 / gamma**3 + 3.0 * t / (2.0 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, 1.0, inner))


def num_bits(num_experts: int) -> int:
    return max(1, math.ceil(math.log2(num_experts)))


def code_bits(num_bits_: int, device=None) -> torch.Tensor:
    """[C, M] 0/1 float: bit j of code l, most significant first."""
    codes = torch.arange(2**num_bits_, device=device)
    shifts = torch.arange(num_bits_ - 1, -1, -1, device=device)
    return ((codes.unsqueeze(1) >> shifts) & 1).float()


def selector_probs(s_TKM: torch.Tensor) -> torch.Tensor:
    """DSelect-k selectors: r[t, i, l] = prod_j (S_ij if bit_j(l) else 1 - S_ij) -> [T, K, C]."""
    bits_CM = code_bits(s_TKM.shape[-1], s_TKM.device)
    s = s_TKM.unsqueeze(2)  # T, K, 1, M
    return (bits_CM * s + (1.0 - bits_CM) * (1.0 - s)).prod(-1)


def selector_probs_reference(s_TKM: torch.Tensor) -> torch.Tensor:
    T, K, M = s_TKM.shape
    out = torch.zeros(T, K, 2**M, dtype=s_TKM.dtype)
    for t in range(T):
        for i in range(K):
            for code in range(2**M):
                p = torch.ones((), dtype=s_TKM.dtype)
                for j in range(M):
                    bit = (code >> (M - 1 - j)) & 1
                    p = p * (s_TKM[t, i, j] if bit else 1.0 - s_TKM[t, i, j])
                out[t, i, code] = p
    return out


def leaf_paths(depth: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each leaf (in order) the heap index of the node at every level [C, M] and whether the path goes
    left there [C, M] (left child gets r, right child 1 - r)."""
    nodes, lefts = [], []
    for leaf in range(2**depth):
        v, path_nodes, path_left = 0, [], []
        for j in range(depth):
            bit = (leaf >> (depth - 1 - j)) & 1
            path_nodes.append(v)
            path_left.append(1.0 - bit)
            v = 2 * v + 1 + bit
        nodes.append(path_nodes)
        lefts.append(path_left)
    return torch.tensor(nodes, device=device), torch.tensor(lefts, device=device)


def tree_reach_probs(r_TKV: torch.Tensor) -> torch.Tensor:
    """Soft binary trees: the probability of reaching each leaf, product along its path -> [T, K, C]."""
    V = r_TKV.shape[-1]
    depth = int(round(math.log2(V + 1)))
    nodes_CM, left_CM = leaf_paths(depth, r_TKV.device)
    r = r_TKV[..., nodes_CM]  # T, K, C, M
    return (left_CM * r + (1.0 - left_CM) * (1.0 - r)).prod(-1)


def tree_reach_probs_reference(r_TKV: torch.Tensor) -> torch.Tensor:
    """Walk every tree from the root, one node at a time."""
    T, K, V = r_TKV.shape
    C = V + 1
    out = torch.zeros(T, K, C, dtype=r_TKV.dtype)

    def walk(t: int, i: int, v: int, p: torch.Tensor) -> None:
        if v >= V:
            out[t, i, v - V] = p
            return
        walk(t, i, 2 * v + 1, p * r_TKV[t, i, v])
        walk(t, i, 2 * v + 2, p * (1.0 - r_TKV[t, i, v]))

    for t in range(T):
        for i in range(K):
            walk(t, i, 0, torch.ones((), dtype=r_TKV.dtype))
    return out
