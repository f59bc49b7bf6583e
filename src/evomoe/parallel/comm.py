"""Autograd-aware collectives for expert parallelism, with byte and time counters.

Legend: R rows, D width. ``all_to_all_rows`` sends ``in_splits[j]`` rows to rank j and receives
``out_splits[j]`` rows from it (uneven sizes: ``all_to_all_single`` with split lists, which gloo supports,
unlike the list form). Its backward is the same exchange with the splits swapped. ``all_gather_rows``
concatenates every rank's rows (sizes may differ); its backward sums each slot's gradient over the ranks
and keeps this rank's slot, the adjoint of the gather (an all-reduce: simple with uneven sizes; a
reduce-scatter would move half the bytes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# newer torch releases renamed all_gather_into_tensor (same arguments); keep working on older ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks and seconds spent in the call, forward and backward.

    On CUDA (NCCL) the collectives are asynchronous: the seconds then count only what the host waited for
    (the split-size exchange synchronises; the token exchange may overlap with compute).
    """

    a2a_bytes: int = 0
    a2a_seconds: float = 0.0
    a2a_calls: int = 0
    gather_bytes: int = 0
    gather_seconds: float = 0.0

    def reset(self) -> None:
        self.a2a_bytes = self.a2a_calls = self.gather_bytes = 0
        self.a2a_seconds = self.gather_seconds = 0.0


def _sent_bytes(x: torch.Tensor, splits: list[int], me: int) -> int:
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    return row * (sum(splits) - splits[me])


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, stats: CommStats | None):
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    tic = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    if stats is not None:
        stats.a2a_seconds += time.perf_counter() - tic
        stats.a2a_bytes += _sent_bytes(x, in_splits, dist.get_rank(group))
        stats.a2a_calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats):  # noqa: D102
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        return _a2a(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        out_splits, in_splits = ctx.splits
        return _a2a(g, in_splits, out_splits, ctx.group, ctx.stats), None, None, None, None


def all_to_all_rows(
    x_RD: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group=None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Rows ``x_RD`` split by ``in_splits`` over the group's ranks -> the rows received, by source rank."""
    return _AllToAll.apply(x_RD, out_splits, in_splits, group, stats)


def exchange_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Equal-split all-to-all of an integer tensor (no gradient): block j goes to rank j."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def gather_sizes(n: int, group=None, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. its number of rows), in rank order."""
    out = torch.empty(dist.get_world_size(group), dtype=torch.long, device=device)
    _all_gather(out, torch.tensor([n], dtype=torch.long, device=device), group=group)
    return out.tolist()


def _gather(x: torch.Tensor, sizes: list[int], group, stats: CommStats | None) -> torch.Tensor:
    tic = time.perf_counter()
    biggest = max(sizes)
    padded = x if x.shape[0] == biggest else torch.cat([x, x.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * biggest, *x.shape[1:]))
    _all_gather(out, padded.contiguous(), group=group)
    if biggest * len(sizes) != sum(sizes):
        out = torch.cat([out[i * biggest : i * biggest + n] for i, n in enumerate(sizes)])
    if stats is not None:
        stats.gather_seconds += time.perf_counter() - tic
        stats.gather_bytes += x.numel() * x.element_size() * (len(sizes) - 1)
    return out


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, stats):  # noqa: D102
        ctx.sizes, ctx.group, ctx.stats = sizes, group, stats
        return _gather(x, sizes, group, stats)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        g = g.contiguous().clone()
        tic = time.perf_counter()
        dist.all_reduce(g, group=ctx.group)
        if ctx.stats is not None:
            n = len(ctx.sizes)  # a ring all-reduce sends 2 (n - 1) / n of the tensor from every rank
            ctx.stats.gather_seconds += time.perf_counter() - tic
            ctx.stats.gather_bytes += g.numel() * g.element_size() * 2 * (n - 1) // n
        me = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:me])
        return g[start : start + ctx.sizes[me]], None, None, None


def all_gather_rows(
    x_RD: torch.Tensor, sizes: list[int], group=None, stats: CommStats | None = None
) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (``sizes[j]`` rows from rank j); autograd-aware.

    Integer and boolean tensors (token ids, masks) go through the same path without gradient.
    """
    if x_RD.dtype == torch.bool:
        return _gather(x_RD.to(torch.uint8), sizes, group, None).bool()
    if not x_RD.is_floating_point():
        return _gather(x_RD, sizes, group, None)
    return _AllGatherRows.apply(x_RD, sizes, group, stats)
