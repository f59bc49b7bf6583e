"""bf16 fast paths against the fp32 reference, forward and backward, with a tolerance taken from bf16 itself.

The budget of each output (y, dx, dW1, dW2) is measured, not assumed: it is twice the error that the
reference formulation (the per-expert loop) makes when it computes in bf16, relative to the largest
fp32 value, plus 1e-3. Weights are drawn at std 0.3 so that outputs are O(1) and a zero output or the
wrong expert's weights are far outside the budget (the negative controls below show that they are).
"""

from __future__ import annotations

import pytest
import torch

import evomoe.moe.experts as experts_mod
from evomoe.moe.experts import Experts, activate
from evomoe.ops.expert_ffn import expert_ffn_fused, expert_ffn_grouped
from evomoe.ops.grouped_mm import grouped_mm_fast, grouped_mm_loop, grouped_mm_padded

NAMES = ("y", "dx", "dW1", "dW2")
COUNTS = [7, 0, 12, 5]


def two_layer(mm):
    def ffn(x, w1, w2, counts_E, activation):
        return mm(activate(mm(x, w1, counts_E), activation), w2, counts_E)

    return ffn


FAST = {
    "fused": expert_ffn_fused,
    "fused_grouped": expert_ffn_grouped,
    "grouped": two_layer(grouped_mm_fast),
    "padded": two_layer(grouped_mm_padded),
}
LOOP = two_layer(grouped_mm_loop)


def operands(activation: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    E, D, F = len(COUNTS), 16, 32
    H = 2 * F if activation == "swiglu" else F
    x = torch.randn(sum(COUNTS), D, generator=g)
    w1 = torch.randn(E, D, H, generator=g) * 0.3
    w2 = torch.randn(E, F, D, generator=g) * 0.3
    g_out = torch.randn(sum(COUNTS), D, generator=g)
    return x, w1, w2, g_out


def outputs(fn, x, w1, w2, g_out, activation: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w1, w2)]
    y = fn(*leaves, torch.tensor(COUNTS), activation)
    assert y.dtype == dtype
    (y.float() * g_out).sum().backward()
    return {n: t.detach().float() for n, t in zip(NAMES, [y] + [leaf.grad for leaf in leaves], strict=True)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def bf16_budget(ref32: dict, ref16: dict) -> dict[str, float]:
    return {n: 2 * rel_err(ref16[n], ref32[n]) + 1e-3 for n in NAMES}


def over_budget(got: dict, ref32: dict, budget: dict) -> list[str]:
    return [
        f"{n}: {rel_err(got[n], ref32[n]):.2e} > {budget[n]:.2e}"
        for n in NAMES
        if rel_err(got[n], ref32[n]) > budget[n]
    ]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_fast_paths_forward_and_backward_within_the_measured_bf16_error(activation):
    x, w1, w2, g_out = operands(activation)
    ref32 = outputs(LOOP, x, w1, w2, g_out, activation, torch.float32)
    budget = bf16_budget(ref32, outputs(LOOP, x, w1, w2, g_out, activation, torch.bfloat16))
    assert all(b < 0.05 for b in budget.values()), budget  # bf16's own error is small at this scale
    for name, fn in FAST.items():
        got = outputs(fn, x, w1, w2, g_out, activation, torch.bfloat16)
        assert not over_budget(got, ref32, budget), (name, over_budget(got, ref32, budget))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_negative_controls_fail_the_bf16_check(activation):
    """What the check above must catch: all zeros, and expert 0 computed with expert 2's weights."""
    x, w1, w2, g_out = operands(activation)
    ref32 = outputs(LOOP, x, w1, w2, g_out, activation, torch.float32)
    budget = bf16_budget(ref32, outputs(LOOP, x, w1, w2, g_out, activation, torch.bfloat16))
    zeros = {n: torch.zeros_like(t) for n, t in ref32.items()}
    assert over_budget(zeros, ref32, budget) and len(over_budget(zeros, ref32, budget)) == 4
    swap = torch.tensor([2, 1, 0, 3])
    for name, fn in FAST.items():
        wrong = outputs(fn, x, w1[swap], w2[swap], g_out, activation, torch.bfloat16)
        wrong["dW1"], wrong["dW2"] = wrong["dW1"][swap], wrong["dW2"][swap]  # gradients back in place
        assert set(over_budget(wrong, ref32, budget)) and "y" in " ".join(
            over_budget(wrong, ref32, budget)
        ), name


def test_autocast_auto_runs_the_grouped_ffn_in_bf16_and_matches_fp32(monkeypatch):
    """Under bf16 autocast ``auto`` picks ``fused_grouped`` (few rows per expert), which must really run,
    in bf16, and agree with the fp32 loop within the budget, gradients included (in fp32 for the leaves)."""
    calls = []
    real = experts_mod.expert_ffn_grouped
    monkeypatch.setattr(experts_mod, "expert_ffn_grouped", lambda x, *a: calls.append(x.dtype) or real(x, *a))
    x, w1, w2, g_out = operands("gelu")
    experts = Experts(len(COUNTS), 16, 32, "gelu", "auto")
    with torch.no_grad():
        experts.w1_EDH.copy_(w1)
        experts.w2_EFD.copy_(w2)
    x_PD = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x_PD, torch.tensor(COUNTS))
    assert y.dtype == torch.bfloat16 and calls == [torch.bfloat16]
    (y.float() * g_out).sum().backward()
    assert x_PD.grad.dtype == torch.float32 and experts.w1_EDH.grad.dtype == torch.float32
    got = dict(
        zip(NAMES, [y.detach().float(), x_PD.grad, experts.w1_EDH.grad, experts.w2_EFD.grad], strict=True)
    )
    ref32 = outputs(LOOP, x, w1, w2, g_out, "gelu", torch.float32)
    budget = bf16_budget(ref32, outputs(LOOP, x, w1, w2, g_out, "gelu", torch.bfloat16))
    assert not over_budget(got, ref32, budget), over_budget(got, ref32, budget)
