"""Grouped matmul: rows grouped by expert times that expert's weight matrix.

Legend: P routed rows (grouped by expert, in expert order), E experts, K in-width, N out-width.
``counts_E`` gives each expert's number of rows. Three implementations share one contract:
- ``grouped_mm_loop``: the per-expert loop (the reference, and the fallback for any dtype/shape);
- ``grouped_mm_fast``: ``torch._grouped_mm`` (int32 offsets, 16-byte aligned rows);
- ``grouped_mm_padded``: pad every expert to the largest count and use one batched matmul.
"""

from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm`` needs it)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()


def _empty_mm(x_PK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
    """The [0, N] result of zero rows, still connected to both operands (their gradients are zeros)."""
    return x_PK @ w_EKN[0]


def grouped_mm_loop(x_PK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per non-empty expert (one host sync for the counts)."""
    outs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outs.append(x_PK[start : start + n] @ w_EKN[e])
        start += n
    if not outs:
        return x_PK.new_zeros(0, w_EKN.shape[2]) + 0 * w_EKN.sum()  # keeps the graph connected
    return torch.cat(outs, 0)


def grouped_mm_supported(x_PK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands on this device and dtype."""
    if not hasattr(torch, "_grouped_mm") or x_PK.dtype != w_EKN.dtype:
        return False
    if x_PK.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x_PK.device)
        if x_PK.dtype != torch.bfloat16 or major < 9:
            return False
    elif x_PK.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x_PK.element_size()
    return x_PK.shape[1] % align == 0 and w_EKN.shape[2] % align == 0


def grouped_mm_fast(x_PK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` with int32 offsets computed on the device (no host sync)."""
    if x_PK.shape[0] == 0:  # the kernel rejects an empty operand
        return _empty_mm(x_PK, w_EKN)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    y_PN = torch._grouped_mm(x_PK.contiguous(), w_EKN, offs=offs_E)
    return _ContiguousGrad.apply(y_PN)


def grouped_mm_padded(x_PK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Pad each expert's rows to the largest count, one ``bmm``, then unpad.

    Wastes FLOPs on skewed loads; wins when loads are balanced and the loop's overhead dominates.
    """
    E = counts_E.shape[0]
    P = x_PK.shape[0]
    if P == 0:
        return _empty_mm(x_PK, w_EKN)
    cap = int(counts_E.max())
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_P = torch.repeat_interleave(torch.arange(E, device=x_PK.device), counts_E, output_size=P)
    slot_P = torch.arange(P, device=x_PK.device) - starts_E[expert_P]
    flat_P = expert_P * cap + slot_P
    x_ECK = x_PK.new_zeros(E * cap, x_PK.shape[1]).index_copy(0, flat_P, x_PK).view(E, cap, -1)
    y_ECN = torch.bmm(x_ECK, w_EKN)
    return y_ECN.reshape(E * cap, -1).index_select(0, flat_P)
