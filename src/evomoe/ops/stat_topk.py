"""Statistical top-k (Spark Transformer; Gemma 3n's Gaussian top-k): a threshold from the row's mean and std.

For a row x of D values and a target of k survivors: theta = mean(x) + std(x) * Phi^-1(1 - k/D), with the
population std and Phi^-1 the standard-normal quantile; x survives when x > theta. Linear time, no sort;
the number of survivors is random, about k when x is roughly Gaussian. Legend: R rows, D values per row.
"""

from __future__ import annotations

import statistics

import torch


def normal_quantile(q: float) -> float:
    return statistics.NormalDist().inv_cdf(q)


def stat_topk_threshold(x_RD: torch.Tensor, k: float) -> torch.Tensor:
    """[R, 1] threshold for a target of ``k`` survivors per row (0 < k < D)."""
    D = x_RD.shape[-1]
    z = normal_quantile(1.0 - k / D)
    mean = x_RD.mean(-1, keepdim=True)
    std = x_RD.std(-1, keepdim=True, unbiased=False)
    return mean + std * z


def stat_topk_mask(x_RD: torch.Tensor, k: float, min_keep: int = 0) -> torch.Tensor:
    """[R, D] bool: x > theta; and a row's ``min_keep`` largest values always survive (ties: the lowest
    index: argmax documents it, a stable sort keeps it; ``torch.topk`` returns any of the tied indices)."""
    keep = x_RD > stat_topk_threshold(x_RD, k)
    if min_keep == 1:  # linear time, as the threshold
        top_RM = x_RD.argmax(dim=-1, keepdim=True)
    elif min_keep > 1:
        top_RM = x_RD.sort(dim=-1, descending=True, stable=True).indices[:, :min_keep]
    else:
        return keep
    return keep | torch.zeros_like(keep).scatter_(1, top_RM, True)


def stat_topk_reference(x_RD: torch.Tensor, k: float, min_keep: int = 0) -> torch.Tensor:
    """Row by row with the standard library's statistics (the slow twin of ``stat_topk_mask``)."""
    D = x_RD.shape[-1]
    z = normal_quantile(1.0 - k / D)
    rows = []
    for row in x_RD.double().tolist():
        theta = statistics.fmean(row) + statistics.pstdev(row) * z
        first = sorted(range(D), key=lambda d: (-row[d], d))[:min_keep]
        rows.append([v > theta or d in first for d, v in enumerate(row)])
    return torch.tensor(rows, dtype=torch.bool)
