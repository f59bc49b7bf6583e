"""The MoE layer's fast path (dispatch -> grouped experts -> combine) against the per-pair reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import evomoe.moe.experts as experts_mod
from evomoe.config import Config
from evomoe.evolve import spawn_layer
from evomoe.moe.dispatcher import LocalDispatcher, moe_reference
from evomoe.moe.experts import Experts
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import Router, RouterContext, RouterSpec, Routing

D, F = 8, 12  # multiples of 4: the grouped kernel accepts fp32 operands
IMPLS = ("grouped", "padded", "loop")
ACTIVATIONS = ("gelu", "relu", "swiglu")


class FixedRouter(Router):
    """Returns a hand-built Routing whatever the input."""

    def __init__(self, routing: Routing, num_experts: int) -> None:
        super().__init__(RouterSpec(D, num_experts))
        self.routing = routing

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        return self.routing


def make_routing(pairs: list[tuple[int, int]], seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    token = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    expert = torch.tensor([e for _, e in pairs], dtype=torch.long)
    weight = torch.rand(len(pairs), generator=g).requires_grad_(True)
    return Routing(token, expert, weight)


def make_layer(E: int, activation: str, impl: str, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, F, activation, impl)
    layer.experts = Experts(E, D, F, activation, impl)
    with torch.no_grad():  # larger than the GPT init so that gradients are well above the tolerance
        layer.experts.w1_EDH.normal_(std=0.3)
        layer.experts.w2_EFD.normal_(std=0.3)
    return layer


def fast_and_reference(
    T: int, E: int, pairs: list[tuple[int, int]], activation: str, impl: str, seed: int = 0
):
    """Output and gradients (x, W1, W2, routing weights) of the layer's fast path and of ``moe_reference``."""
    layer = make_layer(E, activation, impl, seed)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    g_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 2))
    results = []
    for path in ("fast", "reference"):
        layer.zero_grad(set_to_none=True)
        routing = make_routing(pairs, seed)
        layer.router = FixedRouter(routing, E)
        x = x_TD.clone().requires_grad_(True)
        if path == "fast":
            out_BSD, _, stats = layer(x.view(1, T, D), RouterContext())
            out = out_BSD.view(T, D)
            assert int(stats.pairs) == len(pairs)
        else:
            out = moe_reference(x, routing, layer.experts)
        if out.requires_grad:  # the reference with no pairs at all is a constant zero
            (out * g_TD).sum().backward()
        grads = [
            t if t is not None else torch.zeros(s)
            for t, s in (
                (x.grad, x.shape),
                (layer.experts.w1_EDH.grad, layer.experts.w1_EDH.shape),
                (layer.experts.w2_EFD.grad, layer.experts.w2_EFD.shape),
                (routing.weight_P.grad, routing.weight_P.shape),
            )
        ]
        results.append((out.detach(), *grads))
    return results


def assert_match(T, E, pairs, activation, impl, seed=0):
    fast, ref = fast_and_reference(T, E, pairs, activation, impl, seed)
    for name, a, b in zip(("out", "dx", "dW1", "dW2", "dweight"), fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    routed = {t for t, _ in pairs}
    for t in range(T):
        if t not in routed:  # a token with no expert: exactly zero (the residual carries it)
            assert torch.equal(fast[0][t], torch.zeros(D)), t
            assert torch.equal(fast[1][t], torch.zeros(D)), t
    return fast


def shuffled(pairs: list[tuple[int, int]], seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in rng.permutation(len(pairs))]


# name -> (T, E, pairs): pairs deliberately not in expert order
CASES = {
    "empty_experts": (
        9,
        5,
        shuffled([(t, e) for t in range(9) for e in (1, 3) if (t + e) % 2 == 0] + [(0, 3)]),
    ),
    "all_on_one_expert": (11, 4, shuffled([(t, 2) for t in range(11)])),
    "k_equals_E": (7, 4, shuffled([(t, e) for t in range(7) for e in range(4)])),
    "unrouted_tokens": (10, 3, shuffled([(0, 0), (0, 2), (3, 1), (4, 1), (7, 0), (9, 2)])),
    "odd_T": (13, 3, shuffled([(t, t % 3) for t in range(13)] + [(t, (t + 1) % 3) for t in range(0, 13, 2)])),
    "single_token": (1, 6, [(0, 5), (0, 1)]),
    "no_pairs": (5, 3, []),
    "one_expert": (6, 1, [(t, 0) for t in range(0, 6, 2)]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_matches_reference(case, activation, impl):
    T, E, pairs = CASES[case]
    assert_match(T, E, pairs, activation, impl)


@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(1, 40),
    E=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    activation=st.sampled_from(ACTIVATIONS),
    impl=st.sampled_from(IMPLS),
)
def test_fast_path_matches_reference_property(T, E, seed, activation, impl):
    rng = np.random.default_rng(seed)
    pairs = []
    for t in range(T):
        n_t = int(rng.integers(0, E + 1))  # 0..E experts for this token
        pairs += [(t, int(e)) for e in rng.permutation(E)[:n_t]]
    assert_match(T, E, shuffled(pairs, seed), activation, impl, seed=seed % 1000)


@pytest.mark.parametrize("impl", IMPLS)
def test_experts_impls_agree(impl):
    """``Experts.forward`` with each impl equals the loop reference on grouped rows."""
    torch.manual_seed(0)
    experts = Experts(4, D, F, "swiglu", impl)
    counts_E = torch.tensor([5, 0, 9, 2])
    x_PD = torch.randn(16, D)
    torch.testing.assert_close(
        experts(x_PD, counts_E), experts.forward_reference(x_PD, counts_E), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_one_expert_with_weight_one_equals_dense(activation, impl):
    torch.manual_seed(0)
    dense = MoELayer(D, F, activation, impl)
    x_BSD = torch.randn(3, 5, D)
    y_dense, routing, _ = dense(x_BSD, RouterContext())
    assert routing is None and not dense.spawned

    moe = MoELayer(D, F, activation, impl)
    moe.load_state_dict(dense.state_dict())
    T = 15
    pairs = Routing(torch.arange(T), torch.zeros(T, dtype=torch.long), torch.ones(T))
    moe.router = FixedRouter(pairs, 1)
    y_moe, _, _ = moe(x_BSD, RouterContext())
    torch.testing.assert_close(y_moe, y_dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", ["soft", "dts"])
def test_spawned_single_expert_equals_dense(router):
    """``spawn_layer`` with E = 1: the gate's softmax over one expert is 1."""
    cfg = Config()
    cfg.model.d_model = D
    cfg.moe.num_experts = 1
    cfg.router.name = router
    cfg.router.dts.threshold = 0.0
    torch.manual_seed(0)
    layer = MoELayer(D, F, "gelu", "grouped")
    x_BSD = torch.randn(2, 7, D)
    y_dense, _, _ = layer(x_BSD, RouterContext())
    spawn_layer(layer, cfg, torch.Generator().manual_seed(0))
    assert layer.spawned and layer.num_experts == 1
    y_moe, routing, stats = layer.train()(x_BSD, RouterContext())
    assert routing.weight_P.shape == (14,) and int(stats.pairs) == 14
    torch.testing.assert_close(y_moe, y_dense, atol=1e-6, rtol=0)


def test_dispatch_state_is_per_pair():
    """Memory is O(P*D): every dispatch tensor is per pair or per expert, none is T x T."""
    T, E = 64, 4
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(T, D)
    pairs = [(t, int(e)) for t in range(T) for e in torch.randperm(E, generator=g)[: t % 3]]
    routing = make_routing(pairs)
    P = len(pairs)
    x_PD, counts_E, state = LocalDispatcher().dispatch(x_TD, routing, E)
    assert x_PD.shape == (P, D)
    assert counts_E.shape == (E,)
    assert state.token_idx_P.shape == (P,) and state.weight_P.shape == (P,)
    assert state.num_tokens == T
    out = LocalDispatcher().combine(torch.ones(P, D), state)
    assert out.shape == (T, D)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_quadratic_intermediates(impl):
    """No tensor saved for backward has T*T elements or more (the reference code's [T, E, T] combine)."""
    T, E = 256, 4
    layer = make_layer(E, "gelu", impl)
    g = torch.Generator().manual_seed(1)
    expert_P = torch.randint(0, E, (T,), generator=g)
    layer.router = FixedRouter(Routing(torch.arange(T), expert_P, torch.rand(T, generator=g)), E)
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = torch.randn(1, T, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _, _ = layer(x, RouterContext())
    out.sum().backward()
    assert sizes and max(sizes) < T * T


def test_bf16_autocast_every_impl_computes_in_bf16(monkeypatch):
    """Under bf16 autocast every impl computes in bf16 and the explicit ``grouped`` impl runs the bf16
    kernel. Accuracy against fp32 (forward and backward, a budget measured from bf16 itself, negative
    controls) and ``auto`` running ``fused_grouped``: tests/ops/test_bf16.py."""
    calls = []
    real = experts_mod.grouped_mm_fast
    monkeypatch.setattr(experts_mod, "grouped_mm_fast", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    experts = Experts(3, 16, 16, "gelu", "auto")
    counts_E = torch.tensor([4, 0, 7])
    x_PD = torch.randn(11, 16, requires_grad=True)  # float32, as a LayerNorm under autocast returns
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in ("auto", "loop", "padded", "grouped", "fused", "fused_grouped"):
            out = experts(x_PD, counts_E, impl=None if impl == "auto" else impl)
            assert out.dtype == torch.bfloat16, impl
            if impl == "grouped":
                assert calls == [torch.bfloat16, torch.bfloat16]  # both projections, in bf16
    out.float().sum().backward()
    assert x_PD.grad.dtype == torch.float32 and experts.w1_EDH.grad.dtype == torch.float32
