"""E feed-forward experts stored as 3-D weights, computed on rows grouped by expert.

Legend: P rows grouped by expert, E experts, D model width, F expert hidden width, H = F (or 2F for swiglu).

Implementations (``impl``; every one is tested against ``loop``, the reference):
- ``loop``: per-expert matmuls through autograd (``grouped_mm_loop``): the reference;
- ``grouped``: ``torch._grouped_mm`` (CUDA sm90+ in bf16; CPU in fp32/bf16 with 16-byte aligned rows);
- ``padded``: every expert padded to the largest count, one ``bmm``;
- ``fused``: the whole FFN as one autograd function writing into preallocated slices (``expert_ffn_fused``);
- ``fused_grouped``: the same function on ``torch._grouped_mm`` (``expert_ffn_grouped``).
Biased experts (imported GPT-2 MLPs: ``bias=True``) add b1_e, b2_e per row and run only on the matmul
impls (``loop``, ``grouped``, ``padded``; ``auto`` picks ``grouped`` where supported, else ``loop``): the
fused functions have no bias term. ``auto`` picks by device and size, measured in docs/performance.md:
on CPU ``fused`` (it allocates the
least, and fresh memory is what costs most there), or ``fused_grouped`` in bf16 and when experts get few
rows (the Python loop's overhead dominates); on CUDA ``grouped`` where supported (no host sync), else
``loop``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.expert_ffn import expert_ffn_fused, expert_ffn_grouped
from ..ops.grouped_mm import grouped_mm_fast, grouped_mm_loop, grouped_mm_padded, grouped_mm_supported

IMPLS = ("auto", "loop", "grouped", "padded", "fused", "fused_grouped")
# below this many rows per expert (on average) the per-expert Python loop of ``fused`` costs more than
# ``fused_grouped``'s extra memory (measured: GPT d_model 128, 256 rows/expert; layer bench, 64 rows/expert)
SMALL_ROWS_PER_EXPERT = 512


ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
BIAS_IMPLS = ("auto", "loop", "grouped", "padded")


def activate(h_PH: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h_PH)
    if activation == "gelu_tanh":  # GPT-2's "gelu_new"
        return F.gelu(h_PH, approximate="tanh")
    if activation == "relu":
        return F.relu(h_PH)
    if activation == "swiglu":
        gate, up = h_PH.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation '{activation}' (choose from: {', '.join(ACTIVATIONS)})")


def init_std(d_model: int, n_layers: int) -> tuple[float, float]:
    """GPT-2 style: N(0, 0.02) in, N(0, 0.02/sqrt(2L)) for projections back into the residual."""
    return 0.02, 0.02 / math.sqrt(2 * max(n_layers, 1))


def rows_of(b_EN: torch.Tensor, counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each expert's bias repeated for its rows (grouped by expert): [P, N]; no host sync."""
    return b_EN.repeat_interleave(counts_E, dim=0, output_size=num_rows)


class Experts(nn.Module):
    """``num_experts`` FFNs: y = act(x W1_e [+ b1_e]) W2_e [+ b2_e]. ``num_experts=1`` is a dense FFN."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        impl: str = "auto",
        n_layers: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"moe.experts_impl = {impl!r}: choose from: {', '.join(IMPLS)}")
        if bias and impl not in BIAS_IMPLS:
            raise ValueError(
                f"moe.experts_impl = {impl!r} has no bias term; experts with biases (model.mlp_bias) "
                f"run on: {', '.join(BIAS_IMPLS)}"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.impl, self.n_layers = activation, impl, n_layers
        h = 2 * d_ff if activation == "swiglu" else d_ff
        self.w1_EDH = nn.Parameter(torch.empty(num_experts, d_model, h))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.bias = bias
        self.b1_EH = nn.Parameter(torch.zeros(num_experts, h)) if bias else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std_in, std_out = init_std(self.d_model, self.n_layers)
        nn.init.normal_(self.w1_EDH, std=std_in)
        nn.init.normal_(self.w2_EFD, std=std_out)
        if self.bias:
            nn.init.zeros_(self.b1_EH)
            nn.init.zeros_(self.b2_ED)

    def choose_impl(
        self, x_PD: torch.Tensor, w1_EDH: torch.Tensor | None = None, w2_EFD: torch.Tensor | None = None
    ) -> str:
        """``w1_EDH``/``w2_EFD``: the weights as computed (cast to the activations' dtype); default: own."""
        if self.impl != "auto":
            return self.impl
        w1 = self.w1_EDH if w1_EDH is None else w1_EDH
        w2 = self.w2_EFD if w2_EFD is None else w2_EFD
        ok = grouped_mm_supported(x_PD, w1) and grouped_mm_supported(x_PD.new_empty(0, self.d_ff), w2)
        if self.bias:
            return "grouped" if ok and x_PD.device.type == "cuda" else "loop"
        if x_PD.device.type == "cpu":
            small = x_PD.shape[0] < SMALL_ROWS_PER_EXPERT * self.num_experts
            return "fused_grouped" if ok and (small or x_PD.dtype != torch.float32) else "fused"
        return "grouped" if ok else "loop"

    def forward(self, x_PD: torch.Tensor, counts_E: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        """x_PD rows grouped by expert (counts_E[e] rows for expert e, in order) -> y_PD."""
        device = x_PD.device.type
        if torch.is_autocast_enabled(device):  # the grouped kernel is no autocast op: compute in its dtype
            x_PD = x_PD.to(torch.get_autocast_dtype(device))
        w1, w2 = self.w1_EDH, self.w2_EFD
        if x_PD.dtype != w1.dtype:  # autocast does not cover the grouped kernels: cast explicitly
            w1, w2 = w1.to(x_PD.dtype), w2.to(x_PD.dtype)
        impl = impl or self.choose_impl(x_PD, w1, w2)
        if impl == "fused":
            return expert_ffn_fused(x_PD, w1, w2, counts_E, self.activation)
        if impl == "fused_grouped":
            return expert_ffn_grouped(x_PD, w1, w2, counts_E, self.activation)
        mm = {"loop": grouped_mm_loop, "grouped": grouped_mm_fast, "padded": grouped_mm_padded}[impl]
        if not self.bias:
            h_PH = mm(x_PD, w1, counts_E)
            return mm(activate(h_PH, self.activation), w2, counts_E)
        if impl not in BIAS_IMPLS:
            raise ValueError(f"impl {impl!r} has no bias term (choose from: {', '.join(BIAS_IMPLS)})")
        b1_PH, b2_PD = (rows_of(b.to(x_PD.dtype), counts_E, x_PD.shape[0]) for b in (self.b1_EH, self.b2_ED))
        h_PH = mm(x_PD, w1, counts_E) + b1_PH
        return mm(activate(h_PH, self.activation), w2, counts_E) + b2_PD

    def forward_reference(self, x_PD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self.forward(x_PD, counts_E, impl="loop")

    def extra_repr(self) -> str:
        return (
            f"E={self.num_experts}, D={self.d_model}, F={self.d_ff}, act={self.activation}, impl={self.impl}"
            + (", bias" if self.bias else "")
        )
