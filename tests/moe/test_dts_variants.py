"""Issue 13's DTS variants: symmetry breaking that keeps the function at the spawn, the cap on experts per
token, evaluation with the training selection, and the expert-diversity metric (fast vs slow twins)."""

from __future__ import annotations

import pytest
import torch
from test_routers import as_dense

from evomoe.config import Config, router_config
from evomoe.evolve import spawn_model, spawn_weights
from evomoe.models import GPT
from evomoe.moe.diversity import (
    expert_weights_EN,
    mean_pairwise_cosine_distance,
    mean_pairwise_cosine_distance_reference,
)
from evomoe.moe.router import GateState, RouterContext
from evomoe.moe.routers.dts import DTSRouter
from evomoe.moe.routers.dts_plus import DTSPlusRouter, cap_at, top_k_mask, top_k_mask_reference
from evomoe.tasks.lm import lm_forward

D_MODEL, D_FF, E = 16, 32, 4


def small_cfg(router: str = "dts", **evolve) -> Config:
    cfg = Config()
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers = 50, D_MODEL, 2
    cfg.model.n_heads, cfg.model.seq_len, cfg.model.d_ff = 2, 16, D_FF
    cfg.moe.num_experts = E
    cfg.router.name = router
    cfg.router.dts.threshold = 0.0  # every expert selected: the layer is the mean of its experts
    cfg.router.dts_plus.threshold = 0.0
    for k, v in evolve.items():
        setattr(cfg.evolve, k, v)
    return cfg


@pytest.mark.parametrize(
    "router,evolve,gate_std",
    [
        ("dts", {"spawn": "split", "ratio": 0.5}, 0.0),
        ("dts", {"spawn": "split", "ratio": 0.75}, 0.0),
        ("dts", {"spawn": "copy", "noise": 0.5, "zero_sum_noise": True}, 0.0),
        ("dts_plus", {"spawn": "copy"}, 0.5),  # a non-zero gate over copies
    ],
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_symmetry_breaking_spawn_keeps_the_function(router, evolve, gate_std, activation):
    cfg = small_cfg(router, **evolve)
    cfg.model.activation = activation
    cfg.router.gate_init = "zeros"
    cfg.router.dts_plus.gate_std = gate_std
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe).train()
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    before = lm_forward(model, idx, idx).logits.detach()
    spawn_model(model, cfg, torch.Generator().manual_seed(0))
    out = lm_forward(model, idx, idx, gate=GateState(tau=2.0))
    assert all(int(s.pairs) == 3 * 16 * E for s in out.stats)
    torch.testing.assert_close(out.logits.detach(), before, atol=2e-5, rtol=1e-4)
    diversity = [
        float(mean_pairwise_cosine_distance(expert_weights_EN(m.experts))) for m in model.moe_layers()
    ]
    if router == "dts":  # the experts differ (a gate start leaves them copies: their gradients differ)
        assert min(diversity) > 1e-3, diversity
    else:
        assert max(diversity) < 1e-6 and model.moe_layers()[0].router.gate.weight.abs().max() > 0.1


def test_split_keeps_each_neuron_in_k_experts_and_a_negative_control():
    cfg = small_cfg(spawn="split", ratio=0.5)
    w1, w2 = torch.randn(D_MODEL, D_FF), torch.randn(D_FF, D_MODEL)
    w1_EDH, w2_EFD = spawn_weights(w1, w2, E, cfg, torch.Generator().manual_seed(3))
    kept_FE = (w2_EFD != 0).any(2).t()
    assert (kept_FE.sum(1) == 2).all()  # k = round((1 - 0.5) * 4)
    assert torch.equal(w1_EDH, w1.expand_as(w1_EDH))  # inputs stay: a zeroed neuron can grow back
    torch.testing.assert_close(w2_EFD.mean(0), w2)
    cfg.evolve.spawn = "mask"  # the plain mask does not keep the mean
    _, w2_mask = spawn_weights(w1, w2, E, cfg, torch.Generator().manual_seed(3))
    assert not torch.allclose(w2_mask.mean(0), w2)


def test_zero_sum_noise_sums_to_zero_and_plain_noise_does_not():
    w1, w2 = torch.randn(D_MODEL, D_FF), torch.randn(D_FF, D_MODEL)
    zs = spawn_weights(w1, w2, E, small_cfg(spawn="copy", noise=0.3, zero_sum_noise=True), torch.Generator())
    plain = spawn_weights(w1, w2, E, small_cfg(spawn="copy", noise=0.3), torch.Generator().manual_seed(0))
    torch.testing.assert_close(zs[1].mean(0), w2, atol=1e-6, rtol=0)
    assert not torch.allclose(plain[1].mean(0), w2, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# the cap on experts per token


def dts_plus(cap_start: int, E_: int = 8, **opts) -> DTSPlusRouter:
    cfg = router_config(gate_init="normal")
    cfg.dts_plus.cap_start = cap_start
    for k, v in opts.items():
        setattr(cfg.dts_plus, k, v)
    torch.manual_seed(0)
    return DTSPlusRouter.from_config(cfg, D_MODEL, E_).train()


def test_cap_schedule_endpoints():
    assert [cap_at(8, p) for p in (0.0, 0.5, 1.0, 2.0)] == [8, 5, 1, 1]  # 8 - 7 * 0.5 = 4.5 rounds up
    assert cap_at(1, 0.0) == 1


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.7, 1.0])
def test_cap_holds_in_the_soft_phase(progress):
    r = dts_plus(6)
    x = torch.randn(256, D_MODEL)
    routing = r(x, RouterContext(gate=GateState(tau=3.0, progress=progress)))
    k_T = torch.bincount(routing.token_idx_P, minlength=256)
    cap = cap_at(6, progress)
    assert k_T.max() <= cap and k_T.min() >= 1
    assert (k_T == cap).float().mean() > 0.9  # at tau 3 the threshold keeps nearly all: the cap binds
    uncapped = dts_plus(0)(x, RouterContext(gate=GateState(tau=3.0, progress=progress)))
    assert torch.bincount(uncapped.token_idx_P, minlength=256).max() > cap or cap == 6


def test_top_k_mask_matches_its_reference():
    y = torch.rand(40, 8)
    y[3] = 0.5  # ties: the lower expert index wins in both
    for k in (1, 3, 8):
        assert torch.equal(top_k_mask(y, k), top_k_mask_reference(y, k))


# ----------------------------------------------------------------------------------------------------
# evaluation with the training selection


@pytest.mark.parametrize("cls,hard", [(DTSRouter, False), (DTSRouter, True), (DTSPlusRouter, False)])
def test_eval_router_train_matches_the_training_selection(cls, hard):
    cfg = router_config(gate_init="normal")
    cfg.dts_plus.cap_start = 3
    torch.manual_seed(0)
    r = cls.from_config(cfg, D_MODEL, 8)
    x = torch.randn(64, D_MODEL)
    gate = GateState(tau=0.8, hard=hard, progress=0.2)
    torch.manual_seed(5)
    train = r.train()(x, RouterContext(gate=gate))
    torch.manual_seed(5)
    gate.train_selection = True
    with torch.no_grad():
        ev = r.eval()(x, RouterContext(gate=gate))
    for a, b in zip(
        (train.token_idx_P, train.expert_idx_P, train.weight_P),
        (ev.token_idx_P, ev.expert_idx_P, ev.weight_P),
    ):
        assert torch.equal(a.detach(), b)
    gate.train_selection = False  # the default evaluation: deterministic top-1, a different selection
    top1 = r.eval()(x, RouterContext(gate=gate))
    assert top1.token_idx_P.numel() == 64
    if not hard:
        assert ev.token_idx_P.numel() > 64


# ----------------------------------------------------------------------------------------------------
# expert diversity


def test_diversity_matches_its_reference_and_is_zero_for_copies():
    w = torch.randn(5, 300)
    torch.testing.assert_close(
        mean_pairwise_cosine_distance(w),
        mean_pairwise_cosine_distance_reference(w).float(),
        atol=1e-5,
        rtol=0,
    )
    assert float(mean_pairwise_cosine_distance(w[:1].expand(4, 300))) == pytest.approx(0.0, abs=1e-6)
    assert float(mean_pairwise_cosine_distance(torch.cat([w[:1], -w[:1]]))) == pytest.approx(2.0)
    assert float(mean_pairwise_cosine_distance(w[:1])) == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_normalized_weights_keep_the_function_under_any_selection(training):
    cfg = small_cfg("dts_plus", spawn="copy")
    cfg.router.gate_init = "normal"
    cfg.router.dts_plus.cap_start, cfg.router.dts_plus.normalize = 2, True
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe).train(training)
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    before = lm_forward(model, idx, idx).logits.detach()
    spawn_model(model, cfg, torch.Generator().manual_seed(0))
    model.train(training)  # the spawned routers start in training mode
    out = lm_forward(model, idx, idx, gate=GateState(tau=2.0))
    k = 2 if training else 1  # the cap in the soft phase; the deterministic top-1 at evaluation
    assert all(int(s.pairs) == 3 * 16 * k for s in out.stats)
    torch.testing.assert_close(out.logits.detach(), before, atol=2e-5, rtol=1e-4)
    cfg.router.dts_plus.normalize = False  # negative control: masked weights shrink the output
    torch.manual_seed(0)
    plain = GPT(cfg.model, cfg.moe).train(training)
    spawn_model(plain, cfg, torch.Generator().manual_seed(0))
    plain.train(training)
    assert not torch.allclose(lm_forward(plain, idx, idx, gate=GateState(tau=2.0)).logits, before, atol=1e-3)


def test_normalized_weights_still_train_the_gate():
    r = dts_plus(2, normalize=True)
    x = torch.randn(32, D_MODEL)
    routing = r(x, RouterContext(gate=GateState(tau=1.0, hard=True)))
    torch.testing.assert_close(routing.weight_P, torch.ones(32))  # top-1: weight 1 in value
    (routing.weight_P * torch.randn(32)).sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0


def test_frozen_hard_phase_routes_the_same_and_gives_the_gate_no_gradient():
    """freeze_hard: after the hard switch the same pairs and weights, but no gradient reaches the gate; in
    the soft phase the option changes nothing."""
    x = torch.randn(256, D_MODEL)
    for hard in (True, False):
        gate = GateState(tau=0.3, hard=True) if hard else GateState(tau=2.0)
        grads, outs = [], []
        for freeze in (False, True):
            r = dts_plus(2, normalize=True, hard_noise=False, freeze_hard=freeze)
            torch.manual_seed(1)  # the same Gumbel draws in the soft phase
            out = r(x, RouterContext(gate=gate))
            outs.append(out)
            if out.weight_P.requires_grad:
                (out.weight_P * torch.arange(out.weight_P.numel())).sum().backward()
            grads.append(r.gate.weight.grad)
        assert torch.equal(outs[0].expert_idx_P, outs[1].expert_idx_P)
        assert torch.allclose(outs[0].weight_P, outs[1].weight_P)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        assert (grads[1] is None) if hard else torch.allclose(grads[0], grads[1]), hard


def test_hard_phase_without_noise_trains_on_the_evaluated_expert():
    """hard_noise = false: the training selection after the hard switch is argmax(z), the evaluation's; the
    paper's hard phase samples from softmax(z) (a flat gate: most tokens off their argmax)."""
    x = torch.randn(512, D_MODEL)
    hard = GateState(tau=0.3, hard=True)
    for hard_noise in (False, True):
        r = dts_plus(2, normalize=True, hard_noise=hard_noise)
        with torch.no_grad():
            r.gate.weight.mul_(0.1)  # a near-flat gate
        trained = r(x, RouterContext(gate=hard))
        evaluated = r.eval()(x, RouterContext(gate=hard))
        same = (trained.expert_idx_P == evaluated.expert_idx_P).float().mean()
        assert (same == 1.0) if not hard_noise else (same < 0.5), (hard_noise, same)
        assert torch.equal(trained.token_idx_P, torch.arange(512))
    soft = dts_plus(2, hard_noise=False)(x, RouterContext(gate=GateState(tau=2.0)))  # soft phase: unchanged
    assert torch.bincount(soft.token_idx_P, minlength=512).max() == 2


# ----------------------------------------------------------------------------------------------------
# the hard top-k phase's gradient, balance loss and z-loss (docs/crossover.md, "the gate taken apart")


def hard_top2(**opts):
    r = dts_plus(2, cap_end=2, normalize=True, hard_noise=False, **opts)
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(3))
    return r, x, r(x, RouterContext(gate=GateState(tau=0.3, hard=True)))


@pytest.mark.parametrize("normalize_grad", [False, True])
def test_normalize_grad_is_the_renormalised_top_k(normalize_grad):
    """normalize_grad: the weights and the gate's gradient of a renormalised top-2 computed by hand
    (softmax, the two largest, divided by their sum with its gradient); without it the values agree and
    the gradient does not."""
    r, x, routing = hard_top2(normalize_grad=normalize_grad)
    c_P = torch.randn(routing.weight_P.shape, generator=torch.Generator().manual_seed(4))
    (routing.weight_P * c_P).sum().backward()
    got = r.gate.weight.grad.clone()
    r.gate.weight.grad = None
    p_TE = torch.softmax(r.gate(x), -1)
    top_TK = p_TE.detach().topk(2, -1).indices.sort(-1).values
    w_TK = p_TE.gather(1, top_TK)
    w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.weight_P.detach(), w_TK.detach().reshape(-1))
    (w_TK.reshape(-1) * c_P).sum().backward()
    assert torch.allclose(got, r.gate.weight.grad, atol=1e-6) == normalize_grad


@pytest.mark.parametrize("balance_on", ["weights", "probs"])
def test_balance_on_probs_or_weights_matches_its_formula(balance_on):
    """balance_on: l_aux = E * sum_e mean_t(q[:, e]) * mean_t(sel[:, e]) with q the full softmax (probs) or
    the normalised selected weights (weights, the spec's). With the weights, a flatter gate (the logits
    halved: the same top-2) gives a smaller loss: the loss rewards a uniform gate."""
    r, x, routing = hard_top2(balance_on=balance_on)
    z_TE = r.gate(x).detach()
    p_TE = torch.softmax(z_TE, -1)
    sel_TE = top_k_mask(z_TE, 2)
    w_TE = p_TE * sel_TE
    q_TE = p_TE if balance_on == "probs" else w_TE / w_TE.sum(-1, keepdim=True)
    want = 8 * (q_TE.mean(0) * sel_TE.float().mean(0)).sum()
    torch.testing.assert_close(routing.aux["balance"].detach(), want)
    with torch.no_grad():
        r.gate.weight.mul_(0.5)
    flatter = r(x, RouterContext(gate=GateState(tau=0.3, hard=True)))
    assert torch.equal(flatter.expert_idx_P, routing.expert_idx_P)
    if balance_on == "weights":
        assert flatter.aux["balance"] < routing.aux["balance"]


def test_z_loss_is_added_only_when_weighted():
    r, x, routing = hard_top2(z_loss_weight=0.001)
    torch.testing.assert_close(
        routing.aux["z"].detach(), (torch.logsumexp(r.gate(x), -1) ** 2).mean().detach()
    )
    assert r.loss_weights() == {"balance": 0.0, "z": 0.001}
    r0, _, plain = hard_top2()
    assert "z" not in plain.aux and "z" not in r0.loss_weights()


def test_normalize_grad_needs_normalised_top_k():
    from evomoe.config import ConfigError, load_config  # noqa: PLC0415

    base = ["--router.name=dts_plus", "--router.dts_plus.cap_start=2", "--router.dts_plus.normalize=true"]
    load_config("tiny", base + ["--router.dts_plus.normalize_grad=true", "--router.dts_plus.cap_end=2"])
    with pytest.raises(ConfigError, match=r"router\.dts_plus\.normalize_grad = True: needs .*cap_end >= 2"):
        load_config("tiny", base + ["--router.dts_plus.normalize_grad=true"])
    with pytest.raises(ConfigError, match=r"router\.dts_plus\.balance_on = 'mean'"):
        load_config("tiny", base + ["--router.dts_plus.balance_on=mean"])


@pytest.mark.parametrize("gumbel", [False, True])
def test_soft_phase_without_noise_selects_the_gates_own_top_cap(gumbel):
    """gumbel = false (``dts_fine_nonoise``): each token's soft-phase experts are the top-cap of its gate
    scores z above the threshold, the same at every call; with the paper's noise a fresh draw each call."""
    r = dts_plus(4, cap_end=2, normalize=True, gumbel=gumbel, threshold=0.01)
    x = torch.randn(300, D_MODEL, generator=torch.Generator().manual_seed(5))
    gate = GateState(tau=1.5, progress=0.0)
    first, second = (as_dense(r(x, RouterContext(gate=gate)), 300, 8) > 0 for _ in range(2))
    z = x @ r.gate.weight.t()
    expected = top_k_mask(z, 4) & (torch.softmax(z / 1.5, -1) > 0.01)
    if gumbel:
        assert (first != second).any(1).float().mean() > 0.5
        assert (first != expected).any(1).float().mean() > 0.5
    else:
        assert torch.equal(first, expected) and torch.equal(second, expected)
