"""The performance fast paths against their references, forward and gradients (fp32 at 1e-5).

- ``expert_ffn_fused`` (Experts impl "fused", the CPU default) vs the per-expert autograd loop;
- planned gather / weighted scatter-sum (segment sums, fixed-k folds, padding rows) vs per-row references;
- the dispatcher's padded rows (bf16 on CPU) and fixed-k routing vs ``moe_reference``;
- routers that return ``fixed_k`` give exactly the pairs the mask path gives.
"""

from __future__ import annotations

import pytest
import torch

import evomoe.moe.dispatcher as dispatcher_mod
from evomoe.config import router_config
from evomoe.moe.dispatcher import LocalDispatcher, moe_reference
from evomoe.moe.experts import Experts, activate
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import GateState, Router, RouterContext, RouterSpec, Routing, pairs_from_mask
from evomoe.moe.routers.dts import DTSRouter
from evomoe.moe.routers.topk import TopKRouter
from evomoe.ops.expert_ffn import expert_ffn_fused, expert_ffn_grouped
from evomoe.ops.grouped_mm import grouped_mm_loop
from evomoe.ops.permute import (
    ScatterPlan,
    gather_rows_planned,
    inverse_permutation,
    scatter_add_rows_reference,
    scatter_plan,
    weighted_scatter_sum_rows,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _grads(fn, *leaves, g_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)) if g_out is None else g_out
    (out * g_out).sum().backward()
    return [out.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


# ------------------------------------------------------------------------------------------ fused FFN
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "swiglu"])
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 7], [16], [0, 0, 0], [1, 1, 1, 1, 1]])
def test_fused_ffn_matches_loop(activation, counts):
    torch.manual_seed(0)
    E, D, F = len(counts), 8, 12
    experts = Experts(E, D, F, activation, "loop")
    with torch.no_grad():
        experts.w1_EDH.normal_(std=0.3)
        experts.w2_EFD.normal_(std=0.3)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), D)
    w1, w2 = experts.w1_EDH.detach(), experts.w2_EFD.detach()

    def fused(x_, w1_, w2_):
        return expert_ffn_fused(x_, w1_, w2_, counts_E, activation)

    def fused_grouped(x_, w1_, w2_):
        return expert_ffn_grouped(x_, w1_, w2_, counts_E, activation)

    def loop(x_, w1_, w2_):  # what Experts(impl="loop") computes
        h = grouped_mm_loop(x_, w1_, counts_E)
        return grouped_mm_loop(activate(h, activation), w2_, counts_E)

    ref = _grads(loop, x, w1, w2)
    for fn in (fused, fused_grouped):
        for name, a, b in zip(("y", "dx", "dW1", "dW2"), _grads(fn, x, w1, w2), ref, strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=f"{fn.__name__} {name}": f"{n}: {m}")


def test_auto_on_cpu_by_rows_per_expert():
    experts = Experts(2, 8, 8, "gelu", "auto")
    assert experts.choose_impl(torch.zeros(3, 8)) == "fused_grouped"  # few rows per expert
    assert experts.choose_impl(torch.zeros(2 * 512, 8)) == "fused"
    assert experts.choose_impl(torch.zeros(3, 6)) == "fused"  # rows not 16-byte aligned: no _grouped_mm


# ------------------------------------------------------------------------------------------ gather / scatter
def _plans(token_idx_P: torch.Tensor, T: int, k: int | None):
    """The general plan, and for token-major fixed-k pairs a fixed-k plan of a random expert order."""
    yield "general", scatter_plan(token_idx_P, T), None
    if k is not None:
        order_P = torch.randperm(token_idx_P.numel(), generator=torch.Generator().manual_seed(3))
        yield "fixed_k", ScatterPlan(inverse_permutation(order_P), None, k, T), order_P


@pytest.mark.parametrize("T,k", [(9, 1), (7, 2), (5, 3), (6, None), (1, 2)])
def test_weighted_scatter_sum_matches_reference(T, k):
    g = torch.Generator().manual_seed(T)
    D = 4
    if k is None:
        token_idx_P = torch.randint(0, T, (13,), generator=g)  # some tokens with 0 rows, some with several
    else:
        token_idx_P = torch.arange(T).repeat_interleave(k)
    for name, plan, order_P in _plans(token_idx_P, T, k):
        tok = token_idx_P if order_P is None else token_idx_P[order_P]  # rows in the plan's row order
        P = tok.numel()
        y, w = torch.randn(P, D, generator=g), torch.rand(P, generator=g)

        def fast(y_, w_, tok=tok, plan=plan):
            return weighted_scatter_sum_rows(y_, w_, tok, plan)

        def ref(y_, w_, tok=tok):
            return scatter_add_rows_reference(y_ * w_.unsqueeze(1), tok, T)

        for a, b in zip(_grads(fast, y, w), _grads(ref, y, w), strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_gather_planned_zero_rows_and_backward():
    T, D = 6, 3
    x = torch.randn(T, D)
    tok = torch.tensor([4, 0, 0, 2, 5, 0, 1])  # rows 2 and 5 are padding (token 0, zeroed)
    real = torch.tensor([0, 1, 3, 4, 6])
    plan = scatter_plan(tok[real], T)
    plan = ScatterPlan(real[plan.order_S], plan.counts_T, None, T)  # the plan refers to real rows only
    pad = torch.tensor([2, 5])
    xr = x.clone().requires_grad_(True)
    out = gather_rows_planned(xr, tok, plan, pad)
    assert torch.equal(out[pad], torch.zeros(2, D))
    torch.testing.assert_close(out[real], x[tok[real]], atol=0, rtol=0)
    g = torch.randn(7, D)
    out.backward(g)
    expected = scatter_add_rows_reference(g[real], tok[real], T)
    torch.testing.assert_close(xr.grad, expected, **TOL)


# ------------------------------------------------------------------------------------------ the layer
class FixedRouter(Router):
    def __init__(self, routing: Routing, num_experts: int, d: int) -> None:
        super().__init__(RouterSpec(d, num_experts))
        self.routing = routing

    def forward(self, x_TD, ctx):
        return self.routing


def _layer_vs_reference(routing: Routing, T: int, E: int, activation: str = "swiglu"):
    D, F = 8, 12
    torch.manual_seed(0)
    layer = MoELayer(D, F, activation, "auto")
    layer.experts = Experts(E, D, F, activation, "auto")
    with torch.no_grad():
        layer.experts.w1_EDH.normal_(std=0.3)
        layer.experts.w2_EFD.normal_(std=0.3)
    layer.router = FixedRouter(routing, E, D)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    results = []
    for path in ("fast", "reference"):
        layer.zero_grad(set_to_none=True)
        routing.weight_P.grad = None
        xr = x.clone().requires_grad_(True)
        if path == "fast":
            out, _, stats = layer(xr.view(1, T, D), RouterContext())
            assert int(stats.pairs) == routing.token_idx_P.numel()
            out = out.view(T, D)
        else:
            out = moe_reference(xr, routing, layer.experts)
        (out * g).sum().backward()
        results.append(
            (
                out.detach(),
                xr.grad,
                layer.experts.w1_EDH.grad,
                layer.experts.w2_EFD.grad,
                routing.weight_P.grad,
            )
        )
    for name, a, b in zip(("out", "dx", "dW1", "dW2", "dw"), *results, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _routing(token, expert, fixed_k=None, seed=0):
    w = torch.rand(len(token), generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    return Routing(torch.tensor(token), torch.tensor(expert), w, fixed_k=fixed_k)


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_layer_fixed_k_matches_reference(monkeypatch, multiple, k):
    monkeypatch.setattr(dispatcher_mod, "row_multiple", lambda x: multiple)
    T, E = 11, 4
    g = torch.Generator().manual_seed(k)
    expert = [int(e) for t in range(T) for e in torch.randperm(E, generator=g)[:k]]
    token = [t for t in range(T) for _ in range(k)]
    _layer_vs_reference(_routing(token, expert, fixed_k=k), T, E)


@pytest.mark.parametrize("multiple", [1, 8])
def test_layer_variable_k_with_padding_matches_reference(monkeypatch, multiple):
    monkeypatch.setattr(dispatcher_mod, "row_multiple", lambda x: multiple)
    token = [3, 0, 0, 5, 2, 5, 5, 1]  # not token-major; tokens 4, 6 unrouted
    expert = [1, 0, 2, 2, 1, 0, 1, 2]
    _layer_vs_reference(_routing(token, expert), 7, 3)


def test_bf16_dispatch_pads_rows_to_32():
    T, E, D = 70, 3, 16
    x = torch.randn(T, D, dtype=torch.bfloat16)
    routing = _routing(list(range(T)), [t % E for t in range(T)], fixed_k=1)
    x_PD, rows_E, state = LocalDispatcher().dispatch(x, routing, E)
    assert rows_E.tolist() == [32, 32, 32] and x_PD.shape == (96, D)
    assert state.counts_E.tolist() == [24, 23, 23]
    real = state.weight_P != 0
    assert int(real.sum()) == T and torch.equal(x_PD[~real], torch.zeros(96 - T, D, dtype=torch.bfloat16))
    out = LocalDispatcher().combine(x_PD, state)  # identity experts: out = w * x
    expected = x.float() * routing.weight_P.detach().unsqueeze(1)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------ routers
@pytest.mark.parametrize("k", [1, 2])
def test_topk_router_fixed_k_pairs(k):
    cfg = router_config(name="topk", gate_init="normal")
    cfg.topk.k = k
    r = TopKRouter.from_config(cfg, 16, 6)
    routing = r(torch.randn(10, 16), RouterContext())
    assert routing.fixed_k == k
    assert routing.token_idx_P.tolist() == [t for t in range(10) for _ in range(k)]
    cfg.topk.capacity_factor = 1.0
    assert TopKRouter.from_config(cfg, 16, 6)(torch.randn(10, 16), RouterContext()).fixed_k is None


@pytest.mark.parametrize("mode", ["hard", "eval"])
def test_dts_top1_fixed_k_same_pairs_as_mask(mode):
    torch.manual_seed(0)
    cfg = router_config(name="dts", gate_init="normal")
    r = DTSRouter.from_config(cfg, 16, 5)
    if mode == "eval":
        r.eval()
    x = torch.randn(12, 16)
    ctx = RouterContext(gate=GateState(tau=1.0, hard=True))
    torch.manual_seed(1)
    routing = r(x, ctx)
    assert routing.fixed_k == 1
    torch.manual_seed(1)
    z = r.gate(x)
    sel, y = r.select(z, ctx)
    p = torch.softmax(z, -1)
    combine = y if (r.training and r.cfg.combine == "noisy") else p
    token, expert, weight = pairs_from_mask(sel, combine * sel)
    assert torch.equal(routing.token_idx_P, token) and torch.equal(routing.expert_idx_P, expert)
    torch.testing.assert_close(routing.weight_P, weight, atol=0, rtol=0)
