"""Routers: the Dense-To-Sparse gate (spec section 3), top-k Switch / GShard and the soft gate (section 5)."""

from __future__ import annotations

import math

import pytest
import torch

from evomoe.config import router_config
from evomoe.moe.losses import load_balance_loss
from evomoe.moe.router import GateState, RouterContext
from evomoe.moe.routers.dts import DTSRouter
from evomoe.moe.routers.gate import gumbel_like
from evomoe.moe.routers.soft import SoftRouter
from evomoe.moe.routers.topk import TopKRouter

D = 8


def ctx(tau: float = 1.0, hard: bool = False, valid_T=None) -> RouterContext:
    return RouterContext(gate=GateState(tau=tau, hard=hard), valid_T=valid_T)


def dts(E: int, *, init: str = "normal", seed: int = 0, scale: float = 1.0, **dts_opts) -> DTSRouter:
    cfg = router_config(gate_init=init)
    for k, v in dts_opts.items():
        setattr(cfg.dts, k, v)
    torch.manual_seed(seed)
    r = DTSRouter.from_config(cfg, D, E)
    with torch.no_grad():
        r.gate.weight.mul_(scale)
    return r.train()


def per_token(routing, T: int) -> torch.Tensor:
    return torch.bincount(routing.token_idx_P, minlength=T)


def as_dense(routing, T: int, E: int) -> torch.Tensor:
    """[T, E] combine weights from the pairs (zero where no pair)."""
    w_TE = torch.zeros(T, E, dtype=routing.weight_P.dtype)
    w_TE[routing.token_idx_P, routing.expert_idx_P] = routing.weight_P.detach()
    return w_TE


# ----------------------------------------------------------------------------------------------------
# DTS


def test_dts_logits_float32_under_bf16():
    r = dts(4)
    x = torch.randn(16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = r.gate(x.bfloat16())
        routing = r(x.bfloat16(), ctx(tau=1.0))
    assert z.dtype == torch.float32
    assert routing.weight_P.dtype == torch.float32
    assert routing.probs_TE.dtype == torch.float32
    assert routing.aux["balance"].dtype == torch.float32
    routing2 = r(x.bfloat16(), ctx())  # bf16 input without autocast
    assert routing2.weight_P.dtype == torch.float32
    torch.testing.assert_close(r.gate(x.bfloat16()), x.bfloat16().float() @ r.gate.weight.t())


@pytest.mark.parametrize("E", [2, 4, 8])
def test_dts_zero_gate_soft_phase_selects_all_at_tau2(E):
    r = dts(E, init="zeros")
    T = 128
    torch.manual_seed(1)
    routing = r(torch.randn(T, D), ctx(tau=2.0))
    assert routing.token_idx_P.numel() == T * E
    assert (per_token(routing, T) == E).all()
    torch.testing.assert_close(routing.weight_P, torch.full((T * E,), 1.0 / E))  # clean softmax of zeros


@pytest.mark.parametrize("tau,expected", [(2.0, 16.0), (1.0, 15.7), (0.5, 10.1), (0.3, 5.2), (0.1, 1.9)])
def test_dts_experts_per_token_table(tau, expected):
    """Spec section 3: untrained (zero) gate, threshold 0.001, E = 16."""
    r = dts(16, init="zeros", threshold=0.001)
    T = 4096
    torch.manual_seed(2)
    routing = r(torch.randn(T, D), ctx(tau=tau))
    mean = routing.token_idx_P.numel() / T
    assert mean == pytest.approx(expected, abs=max(0.05 * expected, 0.1))


@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_dts_hard_phase_one_expert_per_token(init):
    r = dts(6, init=init, scale=20.0)
    T = 200
    x = torch.randn(T, D)
    torch.manual_seed(9)
    routing = r(x, ctx(tau=0.5, hard=True))
    assert (per_token(routing, T) == 1).all()
    torch.manual_seed(9)
    z = x @ r.gate.weight.t()
    y_TE = torch.softmax((z + gumbel_like(z)) / 0.5, -1)
    assert torch.equal(routing.expert_idx_P, y_TE.argmax(-1))  # argmax of the noisy tempered y
    p_TE = torch.softmax(z, -1)  # weighted by the clean probability, not renormalised to 1
    torch.testing.assert_close(routing.weight_P, p_TE[torch.arange(T), routing.expert_idx_P])


def test_dts_hard_phase_is_sampled_top1():
    """With equal logits, Gumbel noise spreads the single choice over all experts."""
    r = dts(4, init="zeros")
    T = 400
    torch.manual_seed(3)
    routing = r(torch.randn(T, D), ctx(tau=1.0, hard=True))
    counts = torch.bincount(routing.expert_idx_P, minlength=4)
    assert (counts > T / 8).all()


def test_dts_eval_is_deterministic_top1():
    r = dts(5, scale=30.0).eval()
    x = torch.randn(64, D)
    torch.manual_seed(0)
    a = r(x, ctx(tau=0.3))
    rng_after_a = torch.get_rng_state()
    b = r(x, ctx(tau=0.3, hard=True))
    assert torch.equal(torch.get_rng_state(), rng_after_a)  # no noise drawn at evaluation
    for field in ("token_idx_P", "expert_idx_P", "weight_P"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    p_TE = torch.softmax(x @ r.gate.weight.t(), -1)
    assert a.token_idx_P.tolist() == list(range(64))  # every token, exactly once: no dropping
    assert torch.equal(a.expert_idx_P, p_TE.argmax(-1))
    torch.testing.assert_close(a.weight_P, p_TE.max(-1).values)


def test_dts_combine_clean_masked_not_renormalised():
    r = dts(6, scale=20.0, threshold=0.1)
    T = 64
    x = torch.randn(T, D)
    routing = r(x, ctx(tau=1.0))
    p_TE = torch.softmax(x @ r.gate.weight.t(), -1)
    torch.testing.assert_close(routing.weight_P, p_TE[routing.token_idx_P, routing.expert_idx_P])
    sums = as_dense(routing, T, 6).sum(-1)
    n = per_token(routing, T)
    assert ((n > 0) & (n < 6)).any()  # some tokens partially selected...
    assert (sums[(n > 0) & (n < 6)] < 1 - 1e-6).all()  # ... and their weights are not renormalised


def test_dts_combine_noisy_uses_tempered_weights():
    r = dts(6, scale=10.0, threshold=0.05, combine="noisy")
    x = torch.randn(32, D)
    tau = 0.7
    torch.manual_seed(11)
    routing = r(x, ctx(tau=tau))
    torch.manual_seed(11)
    z = x @ r.gate.weight.t()
    y_TE = torch.softmax((z + gumbel_like(z)) / tau, -1)
    sel_TE = y_TE > 0.05
    assert torch.equal(as_dense(routing, 32, 6) > 0, sel_TE)
    torch.testing.assert_close(routing.weight_P, y_TE[routing.token_idx_P, routing.expert_idx_P])
    r.eval()  # evaluation always combines with the clean probability
    ev = r(x, ctx(tau=tau))
    torch.testing.assert_close(ev.weight_P, torch.softmax(z, -1).max(-1).values)


def test_dts_selection_follows_noisy_tempered_threshold():
    r = dts(5, scale=5.0, threshold=0.08)
    x = torch.randn(40, D)
    torch.manual_seed(5)
    routing = r(x, ctx(tau=0.6))
    torch.manual_seed(5)
    z = x @ r.gate.weight.t()
    y_TE = torch.softmax((z + gumbel_like(z)) / 0.6, -1)
    assert torch.equal(as_dense(routing, 40, 5) > 0, y_TE > 0.08)


@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_dts_balance_loss_is_E_with_zero_grad_when_dense(init):
    E = 6
    r = dts(E, init=init, threshold=0.0)
    routing = r(torch.randn(50, D), ctx(tau=2.0))
    assert routing.token_idx_P.numel() == 50 * E
    loss = routing.aux["balance"]
    assert loss.item() == pytest.approx(E, abs=1e-5)
    (grad,) = torch.autograd.grad(loss, r.gate.weight)
    assert grad.abs().max().item() < 1e-6


def test_dts_balance_loss_formula_when_sparse():
    E, T = 4, 30
    r = dts(E, scale=10.0, threshold=0.2, gumbel=False)
    x = torch.randn(T, D)
    routing = r(x, ctx(tau=1.0))
    p_TE = torch.softmax(x @ r.gate.weight.t(), -1)
    sel_TE = (as_dense(routing, T, E) > 0).float()
    expected = E * ((p_TE * sel_TE).mean(0) * sel_TE.mean(0)).sum()
    torch.testing.assert_close(routing.aux["balance"], expected)
    assert routing.aux["balance"].item() < E


def test_dts_padding_gets_no_pairs_and_is_out_of_the_loss():
    E, T = 5, 24
    r = dts(E, scale=8.0, threshold=0.1, gumbel=False)
    x = torch.randn(T, D)
    valid_T = torch.ones(T, dtype=torch.bool)
    valid_T[[0, 5, 6, 17, 23]] = False
    full = r(x, ctx(tau=0.8, valid_T=valid_T))
    kept = r(x[valid_T], ctx(tau=0.8))
    assert not set(full.token_idx_P.tolist()) & {0, 5, 6, 17, 23}
    remap = torch.nonzero(valid_T).squeeze(1)
    assert torch.equal(full.token_idx_P, remap[kept.token_idx_P])
    assert torch.equal(full.expert_idx_P, kept.expert_idx_P)
    torch.testing.assert_close(full.weight_P, kept.weight_P)
    torch.testing.assert_close(full.aux["balance"], kept.aux["balance"])
    g_full = torch.autograd.grad(full.aux["balance"], r.gate.weight)[0]
    g_kept = torch.autograd.grad(kept.aux["balance"], r.gate.weight)[0]
    torch.testing.assert_close(g_full, g_kept)


def test_dts_selection_has_no_gradient_weights_do():
    E, T = 6, 40
    r = dts(E, scale=10.0, threshold=0.1)
    x = torch.randn(T, D, requires_grad=True)
    routing = r(x, ctx(tau=1.0))
    assert not routing.token_idx_P.requires_grad and not routing.expert_idx_P.requires_grad
    assert routing.token_idx_P.dtype == routing.expert_idx_P.dtype == torch.long
    assert routing.weight_P.requires_grad
    g_w = torch.autograd.grad(routing.weight_P.sum(), r.gate.weight, retain_graph=True)[0]
    assert g_w.abs().max() > 0
    # the balance loss's gradient is that of a constant selection mask
    sel_TE = (as_dense(routing, T, E) > 0).float()
    z = x @ r.gate.weight.t()
    manual = load_balance_loss(torch.softmax(z, -1) * sel_TE, sel_TE)
    g_auto = torch.autograd.grad(routing.aux["balance"], r.gate.weight)[0]
    g_manual = torch.autograd.grad(manual, r.gate.weight)[0]
    torch.testing.assert_close(g_auto, g_manual)


# ----------------------------------------------------------------------------------------------------
# Top-k (Switch, GShard)


def topk(E: int, **opts) -> TopKRouter:
    """A router whose gate is the identity, so that the input rows are the logits (D = E)."""
    cfg = router_config()
    for k, v in opts.items():
        setattr(cfg.topk, k, v)
    r = TopKRouter.from_config(cfg, E, E)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    return r.train()


def logits_for(first: list[int], E: int, second: list[int] | None = None) -> torch.Tensor:
    z = torch.zeros(len(first), E)
    z[torch.arange(len(first)), torch.tensor(first)] = 4.0
    if second is not None:
        z[torch.arange(len(first)), torch.tensor(second)] = 2.0
    return z


@pytest.mark.parametrize("T,E,cf", [(10, 4, 1.0), (13, 3, 1.25), (7, 2, 0.5), (9, 4, 2.0)])
def test_switch_capacity_drops_in_token_order(T, E, cf):
    g = torch.Generator().manual_seed(T)
    first = torch.randint(0, E, (T,), generator=g).tolist()
    first[: T // 2] = [0] * (T // 2)  # make expert 0 overflow
    r = topk(E, k=1, capacity_factor=cf)
    routing = r(logits_for(first, E), ctx())
    C = math.ceil(cf * T / E)
    expected = []
    seen = [0] * E
    for t, e in enumerate(first):
        if seen[e] < C:
            expected.append((t, e))
        seen[e] += 1
    got = sorted(zip(routing.token_idx_P.tolist(), routing.expert_idx_P.tolist(), strict=True))
    assert got == expected
    assert int(routing.dropped) == T - len(expected)
    assert (torch.bincount(routing.expert_idx_P, minlength=E) <= C).all()
    p_TE = torch.softmax(logits_for(first, E), -1)
    torch.testing.assert_close(routing.weight_P, p_TE[routing.token_idx_P, routing.expert_idx_P])


def test_switch_dropless():
    T, E = 20, 4
    r = topk(E, k=1, capacity_factor=0.0)
    routing = r(logits_for([1] * T, E), ctx())
    assert routing.token_idx_P.tolist() == list(range(T))
    assert (routing.expert_idx_P == 1).all()
    assert int(routing.dropped) == 0


def test_switch_aux_and_z_loss_formulas():
    T, E = 24, 4
    torch.manual_seed(0)
    z = torch.randn(T, E) * 2
    r = topk(E, k=1)
    routing = r(z, ctx())
    p = torch.softmax(z, -1)
    f = torch.bincount(p.argmax(-1), minlength=E).float() / T
    P = p.mean(0)
    expected = E * sum(float(f[e]) * float(P[e]) for e in range(E))
    assert routing.aux["balance"].item() == pytest.approx(expected, rel=1e-5)
    lse = torch.logsumexp(z, -1)
    assert routing.aux["z"].item() == pytest.approx(float((lse**2).mean()), rel=1e-5)
    assert r.loss_weights() == {"balance": 0.01, "z": 0.0}


def test_switch_padding_not_routed():
    T, E = 8, 2
    valid_T = torch.tensor([True, False] * 4)
    r = topk(E, k=1, capacity_factor=1.0)
    routing = r(logits_for([0] * T, E), ctx(valid_T=valid_T))
    # 4 valid tokens: C = ceil(4 / 2) = 2, padding neither routed nor counted as dropped
    assert routing.token_idx_P.tolist() == [0, 2]
    assert int(routing.dropped) == 2


def test_gshard_weights_renormalised_and_policy_all():
    T, E = 30, 5
    torch.manual_seed(1)
    z = torch.randn(T, E)
    routing = topk(E, k=2, second_policy="all")(z, ctx())
    p = torch.softmax(z, -1)
    top2 = p.topk(2, -1)
    w_TE = as_dense(routing, T, E)
    assert (per_token(routing, T) == 2).all()
    torch.testing.assert_close(w_TE.sum(-1), torch.ones(T))
    expected = top2.values / top2.values.sum(-1, keepdim=True)
    torch.testing.assert_close(w_TE.gather(1, top2.indices), expected)


def test_gshard_first_choices_before_second_under_capacity():
    # tokens 0, 1: first 1, second 0; tokens 2, 3: first 0, second 1. T = E = 4, cf = 1: C = 2.
    z = logits_for([1, 1, 0, 0], 4, second=[0, 0, 1, 1])
    routing = topk(4, k=2, capacity_factor=1.0)(z, ctx())
    got = sorted(zip(routing.token_idx_P.tolist(), routing.expert_idx_P.tolist(), strict=True))
    assert got == [(0, 1), (1, 1), (2, 0), (3, 0)]  # every first choice kept, every second dropped
    assert int(routing.dropped) == 4


def test_gshard_aux_uses_first_choice():
    T, E = 16, 4
    torch.manual_seed(2)
    z = torch.randn(T, E)
    routing = topk(E, k=2)(z, ctx())
    p = torch.softmax(z, -1)
    f = torch.bincount(p.argmax(-1), minlength=E).float() / T
    expected = E * float((f * p.mean(0)).sum())
    assert routing.aux["balance"].item() == pytest.approx(expected, rel=1e-5)


def test_gshard_sampling_policy():
    T, E = 600, 4
    z = logits_for([0] * T, E)  # first choice 0; the other three tie
    r = topk(E, k=2, second_policy="sampling")
    torch.manual_seed(4)
    routing = r(z, ctx())
    second = routing.expert_idx_P.view(T, 2)[:, 1]
    assert (second != 0).all()
    counts = torch.bincount(second, minlength=E)[1:]
    assert (counts > T / 6).all()  # sampled, not always the same runner-up
    r.eval()
    ev = r(logits_for([0] * T, E, second=[2] * T), ctx())
    assert (ev.expert_idx_P.view(T, 2)[:, 1] == 2).all()  # evaluation: the second best


def test_gshard_random_policy():
    T, E = 2000, 4
    z = torch.zeros(T, E)
    z[:, 0] = 1.0  # p2 = 1 / (e + 3) ~ 0.17: the second is kept with probability 2 * p2 ~ 0.35
    r = topk(E, k=2, second_policy="random")
    torch.manual_seed(5)
    routing = r(z, ctx())
    n = per_token(routing, T)
    p2 = 1.0 / (math.e + 3)
    kept = float((n == 2).float().mean())
    assert 0 < kept < 1 and kept == pytest.approx(2 * p2, abs=0.05)
    assert int(routing.dropped) == 0  # a second choice not kept by the policy is not a capacity drop
    r.eval()
    ev = r(z, ctx())
    assert (per_token(ev, T) == 2).all()  # never random at evaluation


# ----------------------------------------------------------------------------------------------------
# Soft


def test_soft_every_token_every_expert():
    T, E = 12, 5
    torch.manual_seed(0)
    r = SoftRouter.from_config(router_config(gate_init="normal"), D, E)
    with torch.no_grad():
        r.gate.weight.mul_(20)
    x = torch.randn(T, D)
    routing = r(x, ctx())
    assert routing.token_idx_P.numel() == T * E
    assert (per_token(routing, T) == E).all()
    w_TE = as_dense(routing, T, E)
    torch.testing.assert_close(w_TE.sum(-1), torch.ones(T))
    torch.testing.assert_close(w_TE, torch.softmax(x @ r.gate.weight.t(), -1))
    valid_T = torch.arange(T) % 3 != 0
    masked = r(x, ctx(valid_T=valid_T))
    assert set(masked.token_idx_P.tolist()) == set(torch.nonzero(valid_T).squeeze(1).tolist())
