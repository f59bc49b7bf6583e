"""E feed-forward experts stored as 3-D weights, computed on rows grouped by expert.

Legend: P rows grouped by expert, E experts, D model width, F expert hidden width, H = F (or 2F for swiglu).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.grouped_mm import grouped_mm_fast, grouped_mm_loop, grouped_mm_padded, grouped_mm_supported

IMPLS = ("auto", "loop", "grouped", "padded")


def activate(h_PH: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h_PH)
    if activation == "relu":
        return F.relu(h_PH)
    if activation == "swiglu":
        gate, up = h_PH.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation '{activation}' (choose from: gelu, relu, swiglu)")


def init_std(d_model: int, n_layers: int) -> tuple[float, float]:
    """GPT-2 style: N(0, 0.02) in, N(0, 0.02/sqrt(2L)) for projections back into the residual."""
    return 0.02, 0.02 / math.sqrt(2 * max(n_layers, 1))


class Experts(nn.Module):
    """``num_experts`` FFNs: y = act(x W1_e) W2_e. ``num_experts=1`` is a plain dense FFN."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        impl: str = "auto",
        n_layers: int = 1,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"moe.experts_impl = {impl!r}: choose from: {', '.join(IMPLS)}")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.impl, self.n_layers = activation, impl, n_layers
        h = 2 * d_ff if activation == "swiglu" else d_ff
        self.w1_EDH = nn.Parameter(torch.empty(num_experts, d_model, h))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std_in, std_out = init_std(self.d_model, self.n_layers)
        nn.init.normal_(self.w1_EDH, std=std_in)
        nn.init.normal_(self.w2_EFD, std=std_out)

    def choose_impl(self, x_PD: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        ok = grouped_mm_supported(x_PD, self.w1_EDH) and grouped_mm_supported(
            x_PD.new_empty(0, self.d_ff), self.w2_EFD
        )
        return "grouped" if ok else "loop"

    def forward(self, x_PD: torch.Tensor, counts_E: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        """x_PD rows grouped by expert (counts_E[e] rows for expert e, in order) -> y_PD."""
        impl = impl or self.choose_impl(x_PD)
        w1, w2 = self.w1_EDH, self.w2_EFD
        if x_PD.dtype != w1.dtype:  # autocast does not cover the grouped kernels: cast explicitly
            w1, w2 = w1.to(x_PD.dtype), w2.to(x_PD.dtype)
        mm = {"loop": grouped_mm_loop, "grouped": grouped_mm_fast, "padded": grouped_mm_padded}[impl]
        h_PH = mm(x_PD, w1, counts_E)
        return mm(activate(h_PH, self.activation), w2, counts_E)

    def forward_reference(self, x_PD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self.forward(x_PD, counts_E, impl="loop")

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, act={self.activation}, impl={self.impl}"
