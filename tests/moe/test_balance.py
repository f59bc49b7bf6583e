"""Balancing for every learned router: LBL variants, sequence structure helpers, aux-loss-free bias."""

from __future__ import annotations

import pytest
import torch

from evomoe.moe.balance import BalanceOptions, Balancer, bias_update_reference
from evomoe.moe.losses import (
    balance_loss,
    chunk_index,
    chunk_sparsity_loss,
    chunk_sparsity_loss_reference,
    locality_loss,
    previous_token_index,
    sequence_balance_loss,
)
from evomoe.moe.router import GateState, RouterContext, RouterSpec
from evomoe.moe.routers.dts import DTSOptions, DTSRouter
from evomoe.moe.routers.topk import TopKOptions, TopKRouter


@pytest.mark.parametrize("seed", range(4))
def test_lbl_is_one_at_uniform_probabilities_for_any_load(seed):
    g = torch.Generator().manual_seed(seed)
    T, E = 50, 8
    p = torch.full((T, E), 1.0 / E, requires_grad=True)
    skewed = torch.zeros(T, E)
    skewed[torch.arange(T), torch.randint(0, 2, (T,), generator=g)] = 1  # two experts take everything
    for assign in (skewed, torch.rand(T, E, generator=g) > 0.5):
        torch.testing.assert_close(balance_loss(p, assign), torch.tensor(1.0))
        torch.testing.assert_close(sequence_balance_loss(p, assign, (5, 10)), torch.tensor(1.0))


def test_lbl_minimum_at_uniform_load_and_larger_when_skewed():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(64, 4), -1)
    one_hot = torch.nn.functional.one_hot(p.argmax(-1), 4)
    assert balance_loss(p, one_hot) > 1.0
    uniform = torch.nn.functional.one_hot(torch.arange(64) % 4, 4)
    torch.testing.assert_close(balance_loss(torch.full((64, 4), 0.25), uniform), torch.tensor(1.0))


def test_sequence_lbl_is_the_mean_of_per_sequence_losses_and_ignores_padding():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(12, 4), -1)
    a = torch.rand(12, 4) > 0.6
    per_seq = [balance_loss(p[i * 4 : (i + 1) * 4], a[i * 4 : (i + 1) * 4]) for i in range(3)]
    torch.testing.assert_close(sequence_balance_loss(p, a, (3, 4)), torch.stack(per_seq).mean())
    valid = torch.ones(12, dtype=torch.bool)
    valid[4:8] = False  # the whole second sequence is padding
    want = torch.stack([per_seq[0], per_seq[2]]).mean()
    torch.testing.assert_close(sequence_balance_loss(p, a, (3, 4), valid), want)


def test_global_lbl_adds_the_step_counts_of_earlier_micro_batches():
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(10, 4), -1)
    a1, a2 = torch.rand(10, 4) > 0.5, torch.rand(10, 4) > 0.5
    b = Balancer(4, BalanceOptions(balance="global")).train()
    b.losses(p, a1, None)
    got = b.losses(p, a2, None)["balance"]
    f = (a1.float().sum(0) + a2.float().sum(0)) / (a1.sum() + a2.sum())
    torch.testing.assert_close(got, 4 * (f * p.mean(0)).sum())
    b.on_step()
    assert b.step_counts_E.sum() == 0


def test_bias_update_follows_the_sign_of_the_load_error():
    b = Balancer(4, BalanceOptions(bias_rate=0.001)).train()
    assign = torch.tensor([[1, 0, 0, 0]] * 6 + [[0, 1, 0, 0]] * 2, dtype=torch.bool)
    b.losses(torch.full((8, 4), 0.25), assign, None)
    b.on_step()
    want = bias_update_reference([0.0] * 4, [6.0, 2.0, 0.0, 0.0], 0.001)
    torch.testing.assert_close(b.bias_E, torch.tensor(want))
    assert b.bias_E[0] < 0 < b.bias_E[2]
    with torch.no_grad():  # evaluation forwards do not count
        b.eval()
        b.losses(torch.full((8, 4), 0.25), assign, None)
    assert b.step_counts_E.sum() == 0


def test_previous_token_never_crosses_a_sequence_or_padding():
    valid = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    prev = previous_token_index((2, 3), valid)
    assert prev.tolist() == [-1, 0, 1, -1, 3, -1]


def test_locality_loss_ignores_pairs_across_sequence_boundaries():
    torch.manual_seed(3)
    s = torch.randn(6, 4)
    prev = previous_token_index((2, 3))
    pairs = [(1, 0), (2, 1), (4, 3), (5, 4)]  # (t, prev t) inside each sequence; 3 <- 2 crosses
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = torch.stack([bce(100 * s[p], torch.sigmoid(100 * s[t])) for t, p in pairs]).mean()
    torch.testing.assert_close(locality_loss(s, prev, 100.0), want)
    s2 = s.clone()
    s2[2] += 5.0  # the last token of sequence 0 changes: only pairs inside sequence 0 may move
    s3 = s2.clone()
    s3[3] -= 5.0  # the first token of sequence 1 has no previous token; it moves only the (4, 3) pair
    only_43 = lambda x: bce(100 * x[3], torch.sigmoid(100 * x[4]))  # noqa: E731
    delta = locality_loss(s3, prev, 100.0) - locality_loss(s2, prev, 100.0)
    torch.testing.assert_close(delta, (only_43(s3) - only_43(s2)) / 4)


@pytest.mark.parametrize("shape,chunk", [((2, 8), 4), ((1, 7), 3), ((3, 4), 8)])
def test_chunk_loss_equals_brute_force_at_least_one_fires(shape, chunk):
    torch.manual_seed(4)
    T = shape[0] * shape[1]
    p = torch.softmax(torch.randn(T, 3), -1)
    torch.testing.assert_close(
        chunk_sparsity_loss(p, shape, chunk),
        chunk_sparsity_loss_reference(p, shape, chunk),
        atol=1e-5,
        rtol=0,
    )
    valid = torch.rand(T) > 0.3
    torch.testing.assert_close(
        chunk_sparsity_loss(p, shape, chunk, valid),
        chunk_sparsity_loss_reference(p, shape, chunk, valid),
        atol=1e-5,
        rtol=0,
    )


def test_chunks_stay_inside_sequences():
    idx, n = chunk_index((2, 5), 2)
    assert n == 6 and idx.tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]


def test_topk_and_dts_take_the_shared_balancing_only_when_asked():
    from evomoe.moe.router import GateState, RouterContext, RouterSpec
    from evomoe.moe.routers.dts import DTSOptions, DTSRouter
    from evomoe.moe.routers.topk import TopKOptions, TopKRouter

    spec = lambda o: RouterSpec(d_model=8, num_experts=4, options=o)  # noqa: E731
    assert set(TopKRouter(spec(TopKOptions())).state_dict()) == {"gate.weight"}  # earlier releases' layout
    assert set(DTSRouter(spec(DTSOptions())).state_dict()) == {"gate.weight"}
    torch.manual_seed(0)
    r = TopKRouter(spec(TopKOptions(bias_rate=0.01))).train()
    x = torch.randn(32, 8)
    ctx = RouterContext(gate=GateState(), shape=(4, 8))
    with torch.no_grad():
        r.balancer.bias_E.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    out = r(x, ctx)
    assert (out.expert_idx_P == 2).all()  # the bias picks the expert ...
    torch.testing.assert_close(out.weight_P, torch.softmax(r.gate(x), -1)[:, 2])  # ... not the weight
    r.on_step(0)
    assert r.balancer.bias_E[2] < 5.0 and r.balancer.bias_E[0] > 0.0  # overloaded down, idle up
    d = DTSRouter(spec(DTSOptions(balance="sequence", balance_weight=0.01))).train()
    aux = d(x, RouterContext(gate=GateState(tau=1.0), shape=(4, 8))).aux
    assert torch.isfinite(aux["balance"])


# ------------------------------------------------------------------------ the bias's load, one scale for DTS
def fixed_logits_router(cls, opts, logits_E: list[float], T: int):
    """A router over E experts whose gate gives every one of T tokens the logits ``logits_E``."""
    E = len(logits_E)
    r = cls(RouterSpec(d_model=E, num_experts=E, options=opts)).train()
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor(logits_E).unsqueeze(1) * torch.eye(E)[0])
    return r, torch.eye(E)[0].expand(T, E).clone()


def test_topk_bias_counts_every_pair_as_load_not_only_first_choices():
    """k = 2, logits [2, 1, 0, 0]: pairs per expert [8, 8, 0, 0], so both chosen experts are overloaded
    (DeepSeek-V3's load: the tokens routed to e). The GShard loss keeps the first choice's fraction."""
    r, x = fixed_logits_router(TopKRouter, TopKOptions(k=2, bias_rate=0.1), [2.0, 1.0, 0.0, 0.0], 8)
    out = r(x, RouterContext(gate=GateState(), shape=(1, 8)))
    assert torch.bincount(out.expert_idx_P, minlength=4).tolist() == [8, 8, 0, 0]
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 0.0]), -1)
    torch.testing.assert_close(out.aux["balance"], 4 * p[0])  # f = [1, 0, 0, 0]: first choices only
    r.on_step(0)
    torch.testing.assert_close(r.balancer.bias_E, torch.tensor([-0.1, -0.1, 0.1, 0.1]))


def reference_dts_balance(w_TE: torch.Tensor, sel_TE: torch.Tensor) -> torch.Tensor:
    """The spec's l_aux = E * sum_e mean_t(w[:, e]) * mean_t(sel[:, e]), written out."""
    T, E = w_TE.shape
    return E * sum((w_TE[:, e].sum() / T) * (sel_TE[:, e].float().sum() / T) for e in range(E))


def dts_routing(balance: str, bias_rate: float, x: torch.Tensor, shape, seed: int = 0):
    """A soft-phase DTS forward (several experts per token) and its dense weights and selection."""
    E = 4
    opts = DTSOptions(balance=balance, bias_rate=bias_rate, balance_weight=0.01, threshold=0.05)
    r = DTSRouter(RouterSpec(d_model=x.shape[1], num_experts=E, options=opts)).train()
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(E, x.shape[1], generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(seed)
    out = r(x, RouterContext(gate=GateState(tau=2.0), shape=shape))
    w = torch.zeros(x.shape[0], E)
    w[out.token_idx_P, out.expert_idx_P] = out.weight_P.detach()
    return r, out, w, w > 0


@pytest.mark.parametrize("balance", ["batch", "sequence", "global"])
def test_dts_balance_is_the_reference_in_every_mode_with_and_without_bias(balance):
    """One sequence, one micro-batch: every mode is the spec's l_aux, and a bias that moves nothing yet
    (rate 1e-9, bias 0) leaves it unchanged (it once divided it by the mean experts per token)."""
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(3))
    values = []
    for rate in (0.0, 1e-9):
        _, out, w, sel = dts_routing(balance, rate, x, (1, 24))
        assert sel.sum(1).float().mean() > 1.5  # the soft phase: the case where the scales differed
        torch.testing.assert_close(out.aux["balance"], reference_dts_balance(w, sel))
        values.append(out.aux["balance"])
    torch.testing.assert_close(values[0], values[1])


def test_dts_sequence_and_global_balance_on_the_reference_scale():
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(4))
    _, out, w, sel = dts_routing("sequence", 1e-9, x, (3, 8))
    per_seq = [reference_dts_balance(w[i * 8 : (i + 1) * 8], sel[i * 8 : (i + 1) * 8]) for i in range(3)]
    torch.testing.assert_close(out.aux["balance"], torch.stack(per_seq).mean())
    # global: f over the step's tokens so far, P over the current micro-batch
    r, _, _, sel1 = dts_routing("global", 1e-9, x[:16], (2, 8))
    torch.manual_seed(1)
    second = r(x[16:], RouterContext(gate=GateState(tau=2.0), shape=(1, 8)))
    w2 = torch.zeros(8, 4)
    w2[second.token_idx_P, second.expert_idx_P] = second.weight_P.detach()
    f = torch.cat([sel1, w2 > 0]).float().mean(0)
    torch.testing.assert_close(second.aux["balance"], 4 * (f * w2.mean(0)).sum())


@pytest.mark.parametrize("router", ["topk", "stat_topk"])
def test_global_balance_and_bias_add_up_three_micro_batches(router):
    """Three micro-batches of one step with different routing: the third's f counts all three (added, not
    overwritten by the last), and the bias moves by the load of the whole step. With two micro-batches
    overwriting and adding agree; with three they differ (checked, so the fixture keeps that power)."""
    from evomoe.moe.routers.stat_topk import StatTopkOptions, StatTopkRouter

    E, D = 4, 6
    if router == "topk":  # f: first choices per token; load: both choices
        cls, opts = TopKRouter, TopKOptions(k=2, balance="global", bias_rate=0.1)
    else:  # f: the share of pairs; load: the same pairs
        cls, opts = StatTopkRouter, StatTopkOptions(balance="global", bias_rate=0.1)
    r = cls(RouterSpec(d_model=D, num_experts=E, options=opts)).train()
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(0)))
    assign, load, auxes, probs = [], [], [], []
    for i, (T, shift) in enumerate([(12, 0), (8, 1), (10, 3)]):  # each micro-batch favours other experts
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(10 + i)) + shift * r.gate.weight[shift]
        out = r(x, RouterContext(gate=GateState(), shape=(1, T)))
        pairs = torch.zeros(T, E)
        pairs[out.token_idx_P, out.expert_idx_P] = 1.0
        load.append(pairs)
        first = torch.nn.functional.one_hot(torch.softmax(r.gate(x), -1).argmax(-1), E).float()
        assign.append(first if router == "topk" else pairs)
        probs.append(torch.softmax(r.gate(x), -1).detach())
        auxes.append(out.aux["balance"].detach())

    def f_of(parts):
        a = torch.cat(parts)
        return a.mean(0) if router == "topk" else a.sum(0) / a.sum()

    added, overwritten = f_of(assign), f_of(assign[1:])
    assert not torch.allclose(added, overwritten, atol=1e-3)
    torch.testing.assert_close(auxes[2], E * (added * probs[2].mean(0)).sum())
    step_load, last_load = torch.cat(load).sum(0), load[2].sum(0)
    error_sign = lambda x: torch.sign(x.mean() - x)  # noqa: E731
    assert not torch.equal(error_sign(step_load), error_sign(last_load))
    r.on_step(0)
    want = bias_update_reference([0.0] * E, step_load.tolist(), 0.1)
    torch.testing.assert_close(r.balancer.bias_E, torch.tensor(want))
