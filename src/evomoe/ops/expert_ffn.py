"""The whole expert FFN, y = act(x W1_e) W2_e on rows grouped by expert, as one autograd function.

Legend: P rows grouped by expert, E experts, D model width, F hidden width, H = F (2F for swiglu).
Reference: ``grouped_mm_loop`` -> activation -> ``grouped_mm_loop`` through autograd (``Experts`` with
``impl="loop"``). This fused twin computes the same products per expert but writes every product into
preallocated slices (``out=``), computes the activation and its gradient in place without temporaries
(autograd's swiglu alone allocates silu(gate), the product, two gradient halves and their ``cat``), and
needs no ``cat`` of per-expert outputs. On CPU fresh memory costs page faults that weigh as much as the
elementwise work itself (docs/performance.md). Same arithmetic and dtypes as the loop reference.
Needs the counts on the host (free on CPU; on CUDA use ``grouped_mm_fast``).
"""

from __future__ import annotations

import torch

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


def _approx(activation: str) -> str:
    """GELU variant: exact (erf) or GPT-2's tanh approximation."""
    return "tanh" if activation == "gelu_tanh" else "none"


def activation_into(h_NH: torch.Tensor, out_NF: torch.Tensor, activation: str) -> None:
    """out = act(h) without temporaries (swiglu: silu(gate) * up, the halves of h)."""
    if activation == "swiglu":
        f = out_NF.shape[1]
        torch.ops.aten.silu.out(h_NH[:, :f], out=out_NF)
        out_NF.mul_(h_NH[:, f:])
    elif activation in ("gelu", "gelu_tanh"):
        torch.ops.aten.gelu.out(h_NH, approximate=_approx(activation), out=out_NF)
    elif activation == "relu":
        torch.clamp_min(h_NH, 0, out=out_NF)
    else:
        raise ValueError(f"unknown activation '{activation}' (choose from: {', '.join(ACTIVATIONS)})")


def activation_grad_into(
    h_NH: torch.Tensor, ga_NF: torch.Tensor, gh_NH: torch.Tensor, activation: str
) -> None:
    """gh = d act(h) / dh applied to the incoming ``ga`` (may overwrite ``ga``)."""
    if activation == "swiglu":
        f = ga_NF.shape[1]
        gate, up = h_NH[:, :f], h_NH[:, f:]
        g_gate, g_up = gh_NH[:, :f], gh_NH[:, f:]
        torch.ops.aten.silu.out(gate, out=g_up)
        g_up.mul_(ga_NF)  # d/d up = ga * silu(gate)
        ga_NF.mul_(up)  # d/d gate = silu'(gate) * ga * up
        torch.ops.aten.silu_backward.grad_input(ga_NF, gate, grad_input=g_gate)
    elif activation in ("gelu", "gelu_tanh"):
        torch.ops.aten.gelu_backward.grad_input(
            ga_NF, h_NH, approximate=_approx(activation), grad_input=gh_NH
        )
    elif activation == "relu":
        torch.ops.aten.threshold_backward.grad_input(ga_NF, h_NH, 0, grad_input=gh_NH)
    else:
        raise ValueError(f"unknown activation '{activation}' (choose from: {', '.join(ACTIVATIONS)})")


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class _ExpertFFN(torch.autograd.Function):
    """Per expert: up-projection, activation, down-projection into slices of preallocated outputs; the
    backward's temporaries live in two buffers of max(counts) rows reused by every expert (allocating
    them for all P rows at once measured slower: fresh memory is what costs most on CPU)."""

    @staticmethod
    def forward(ctx, x_PD, w1_EDH, w2_EFD, counts, activation):  # noqa: D102
        P, f, D = x_PD.shape[0], w2_EFD.shape[1], w2_EFD.shape[2]
        x_PD = x_PD.contiguous()
        h_PH = x_PD.new_empty(P, w1_EDH.shape[2])
        a_PF = x_PD.new_empty(P, f)
        y_PD = x_PD.new_empty(P, D)
        for e, s, t in _segments(counts):
            torch.mm(x_PD[s:t], w1_EDH[e], out=h_PH[s:t])
            activation_into(h_PH[s:t], a_PF[s:t], activation)
            torch.mm(a_PF[s:t], w2_EFD[e], out=y_PD[s:t])
        ctx.save_for_backward(x_PD, w1_EDH, w2_EFD, h_PH, a_PF)
        ctx.counts, ctx.activation = counts, activation
        return y_PD

    @staticmethod
    def backward(ctx, gy_PD):  # noqa: D102
        x_PD, w1_EDH, w2_EFD, h_PH, a_PF = ctx.saved_tensors
        counts = ctx.counts
        gy_PD = gy_PD.contiguous()
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        gx_PD = torch.empty_like(x_PD) if need_x else None
        gw1 = torch.empty_like(w1_EDH) if need_w1 else None
        gw2 = torch.empty_like(w2_EFD) if need_w2 else None
        for e, n in enumerate(counts):  # experts without rows get zero gradients
            for g in (gw1, gw2) if not n else ():
                if g is not None:
                    g[e].zero_()
        rows = max(counts, default=0)
        ga_buf = x_PD.new_empty(rows, a_PF.shape[1])
        gh_buf = x_PD.new_empty(rows, h_PH.shape[1])
        # oneDNN (bf16/fp16 on CPU) runs x^T @ g ~1.5x slower on a transposed view than on a row-major
        # copy; one transpose of all rows, sliced by columns per expert, is cheaper (MKL fp32: no gap)
        lowp = x_PD.dtype in (torch.bfloat16, torch.float16) and x_PD.device.type == "cpu"
        xT_DP = x_PD.t().contiguous() if lowp and need_w1 else x_PD.t()
        aT_FP = a_PF.t().contiguous() if lowp and need_w2 else a_PF.t()
        for e, s, t in _segments(counts):
            ga, gh = ga_buf[: t - s], gh_buf[: t - s]
            if need_w2:
                torch.mm(aT_FP[:, s:t], gy_PD[s:t], out=gw2[e])
            torch.mm(gy_PD[s:t], w2_EFD[e].t(), out=ga)
            activation_grad_into(h_PH[s:t], ga, gh, ctx.activation)
            if need_x:
                torch.mm(gh, w1_EDH[e].t(), out=gx_PD[s:t])
            if need_w1:
                torch.mm(xT_DP[:, s:t], gh, out=gw1[e])
        return gx_PD, gw1, gw2, None, None


class _GroupedExpertFFN(torch.autograd.Function):
    """The same FFN with ``torch._grouped_mm`` for the matmuls (one call per projection, the per-expert
    loop in C++) and the activation once over all rows: less Python per expert, more memory per step."""

    @staticmethod
    def forward(ctx, x_PD, w1_EDH, w2_EFD, offs_E, activation):  # noqa: D102
        x_PD = x_PD.contiguous()
        h_PH = torch._grouped_mm(x_PD, w1_EDH, offs=offs_E)
        a_PF = h_PH.new_empty(h_PH.shape[0], w2_EFD.shape[1])
        activation_into(h_PH, a_PF, activation)
        ctx.save_for_backward(x_PD, w1_EDH, w2_EFD, offs_E, h_PH, a_PF)
        ctx.activation = activation
        return torch._grouped_mm(a_PF, w2_EFD, offs=offs_E)

    @staticmethod
    def backward(ctx, gy_PD):  # noqa: D102
        x_PD, w1_EDH, w2_EFD, offs_E, h_PH, a_PF = ctx.saved_tensors
        gy_PD = gy_PD.contiguous()
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        gw2 = torch._grouped_mm(a_PF.t(), gy_PD, offs=offs_E) if need_w2 else None
        ga_PF = torch._grouped_mm(gy_PD, w2_EFD.transpose(1, 2), offs=offs_E)
        gh_PH = torch.empty_like(h_PH)
        activation_grad_into(h_PH, ga_PF, gh_PH, ctx.activation)
        del ga_PF
        gx = torch._grouped_mm(gh_PH, w1_EDH.transpose(1, 2), offs=offs_E) if need_x else None
        gw1 = torch._grouped_mm(x_PD.t(), gh_PH, offs=offs_E) if need_w1 else None
        return gx, gw1, gw2, None, None


def expert_ffn_grouped(
    x_PD: torch.Tensor, w1_EDH: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor, activation: str
) -> torch.Tensor:
    """``expert_ffn_fused`` on ``torch._grouped_mm`` (no host sync: the offsets stay on the device)."""
    if x_PD.shape[0] == 0:
        return x_PD @ w1_EDH[0][:, : w2_EFD.shape[1]] @ w2_EFD[0]
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return _GroupedExpertFFN.apply(x_PD, w1_EDH, w2_EFD, offs_E, activation)


def expert_ffn_fused(
    x_PD: torch.Tensor, w1_EDH: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor, activation: str
) -> torch.Tensor:
    """act(x W1_e) W2_e per expert's rows; all operands of one dtype. One host read of ``counts_E``."""
    counts = counts_E.tolist()
    if x_PD.shape[0] == 0:  # keep the graph connected: zero gradients for every weight
        return x_PD @ w1_EDH[0][:, : w2_EFD.shape[1]] @ w2_EFD[0]
    return _ExpertFFN.apply(x_PD, w1_EDH, w2_EFD, counts, activation)
