"""The field's gates: each router's invariants (spec gates.md, "CPU-testable invariants")."""

from __future__ import annotations

import statistics

import pytest
import torch

from evomoe.config import Config, ConfigError, validate
from evomoe.moe.router import GateState, RouterContext, RouterSpec
from evomoe.moe.routers.act_dts import ActDTSOptions, ActDTSRouter
from evomoe.moe.routers.adaptive import AdaptiveCoefficient
from evomoe.moe.routers.blockffn import BlockFFNOptions, BlockFFNRouter
from evomoe.moe.routers.comet import CometOptions, CometRouter
from evomoe.moe.routers.dselect_k import DSelectKOptions, DSelectKRouter
from evomoe.moe.routers.dts import DTSOptions, DTSRouter
from evomoe.moe.routers.remoe import ReMoEOptions, ReMoERouter, adapt_lambda
from evomoe.moe.routers.sigma import SigmaOptions, SigmaRouter, parse_stages, stage_k
from evomoe.moe.routers.stat_topk import StatTopkOptions, StatTopkRouter

D = 8


def make(cls, opts, E: int = 4, layer: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    return cls(RouterSpec(d_model=D, num_experts=E, options=opts, layer_idx=layer)).train()


def dense(routing, T: int, E: int) -> torch.Tensor:
    w = torch.zeros(T, E)
    w[routing.token_idx_P, routing.expert_idx_P] = routing.weight_P.detach()
    return w


def ctx(step: int = 0, spawn: int = 0, tau: float = 1.0, hard: bool = False, **kw) -> RouterContext:
    return RouterContext(gate=GateState(tau=tau, hard=hard, step=step, spawn_step=spawn), **kw)


def saturate(linear: torch.nn.Linear, scale: float = 1e4) -> None:
    with torch.no_grad():
        linear.weight.normal_().mul_(scale)
        linear.bias.zero_()


# ---------------------------------------------------------------------------------------------- DSelect-k
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (8, 3)])
def test_dselect_weights_sum_to_one_and_at_most_k_after_saturation(E, k):
    r = make(DSelectKRouter, DSelectKOptions(k=k), E)
    x = torch.randn(32, D)
    w = dense(r(x, ctx()), 32, E)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert (w > 0).all()  # an unsaturated gate is dense
    saturate(r.z)
    w = dense(r(x, ctx()), 32, E)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert ((w > 0).sum(-1) <= k).all()


def test_dselect_unreachable_codes_carry_the_reach_loss():
    r = make(DSelectKRouter, DSelectKOptions(k=2), E=6)  # codes 6, 7 do not name an expert
    out = r(torch.randn(16, D), ctx())
    assert out.aux["reach"] > 2.0  # sum over 2 selectors of 1 / reachable mass, > 1 each
    with torch.no_grad():
        r.z.weight.zero_()
        r.z.bias.copy_(torch.tensor([-1.0, 0.0, 0.0] * 2))  # first bit 0 always: codes 0-3 only
    out = r(torch.randn(16, D), ctx())
    torch.testing.assert_close(out.aux["reach"], torch.tensor(2.0))
    assert out.expert_idx_P.max() < 4


# ---------------------------------------------------------------------------------------------- COMET
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2)])
def test_comet_weights_sum_to_one_and_at_most_k_after_saturation(E, k):
    r = make(CometRouter, CometOptions(k=k, perm_steps=0), E)
    x = torch.randn(32, D)
    w = dense(r(x, ctx()), 32, E)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    saturate(r.nodes)
    w = dense(r(x, ctx()), 32, E)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert ((w > 0).sum(-1) <= k).all()


def test_comet_permutation_learns_then_hardens_into_a_permutation():
    r = make(CometRouter, CometOptions(k=2, perm_steps=3), E=4)
    x = torch.randn(16, D)
    out = r(x, ctx())
    out.weight_P.sum().backward()
    assert r.perm.phi_GEE.grad is not None and out.aux["perm_entropy"] > 0
    for s in range(3):
        r.on_step(s)
    assert bool(r.perm.hardened)
    assert sorted(r.perm.perm_GE[0].tolist()) == [0, 1, 2, 3]
    r.zero_grad()
    out = r(x, ctx())
    out.weight_P.sum().backward()
    assert r.perm.phi_GEE.grad is None  # frozen: no longer used
    # the hard permutation maps leaves to experts: the same gate with the identity, columns permuted
    ident = make(CometRouter, CometOptions(k=2, perm_steps=0), E=4)
    ident.load_state_dict(
        {k: v for k, v in r.state_dict().items() if not k.startswith("perm.")}, strict=False
    )
    w_id, w = dense(ident(x, ctx()), 16, 4), dense(out, 16, 4)
    torch.testing.assert_close(w[:, r.perm.perm_GE[0]], w_id)


# ---------------------------------------------------------------------------------------------- Sigma
def test_sigma_stages_per_layer_and_switch_step():
    stages = parse_stages("0:2,1; 50:1")
    assert [stage_k(stages, u, layer) for u, layer in [(0, 0), (0, 1), (0, 5), (49, 0), (50, 0)]] == [
        2,
        1,
        1,
        2,
        1,
    ]
    with pytest.raises(ConfigError, match="stages"):
        parse_stages("5:1")
    cfg = Config()
    cfg.router.name, cfg.router.sigma.stages = "sigma", "0:2; 10:99"
    with pytest.raises(ConfigError, match=r"router\.sigma\.stages"):
        validate(cfg)
    r0 = make(SigmaRouter, SigmaOptions(stages="0:2,1; 50:1"), E=4, layer=0)
    x = torch.randn(10, D)
    assert r0(x, ctx(step=149, spawn=100)).fixed_k == 2  # u = 49
    assert r0(x, ctx(step=150, spawn=100)).fixed_k == 1


def test_sigma_top1_router_learns_from_the_weights():
    r = make(SigmaRouter, SigmaOptions(stages="0:1", balance="none"), E=4)
    out = r(torch.randn(10, D), ctx())
    assert not torch.allclose(out.weight_P, torch.ones(10))  # pre-softmax: p of the chosen, not 1
    out.weight_P.sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_changes_selection_not_weights():
    r = make(SigmaRouter, SigmaOptions(stages="0:1", bias_rate=0.5), E=4)
    x = torch.randn(40, D)
    before = r(x, ctx())
    with torch.no_grad():
        r.balancer.bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    after = r(x, ctx())
    assert (after.expert_idx_P == 3).all()
    p = torch.softmax(r.gate(x), -1)
    torch.testing.assert_close(after.weight_P, p[:, 3])  # the unbiased probability
    assert not torch.equal(before.expert_idx_P, after.expert_idx_P)


# ---------------------------------------------------------------------------------------------- stat top-k
def test_stat_topk_router_about_k_experts_and_never_none():
    r = make(StatTopkRouter, StatTopkOptions(k=8.0), E=32)
    with torch.no_grad():
        r.gate.weight.normal_()
    out = r(torch.randn(512, D), ctx())
    per_token = torch.bincount(out.token_idx_P, minlength=512)
    assert per_token.min() >= 1
    assert 5.0 < per_token.float().mean() < 11.0  # target 8 of 32, a rough Gaussian fit


@pytest.mark.parametrize("renormalize", [False, True])
def test_stat_topk_shifted_min_keep_expert_has_a_positive_weight(renormalize):
    """E 16, k 2, logits [0] * 15 + [-10]: no expert passes the threshold, min_keep keeps expert 0 (the
    first of the ties). Its shifted weight ReLU(z - theta) is 0: the token takes softmax weights instead,
    positive, and (not renormalised) with a gradient to the gate."""
    E = 16
    opts = StatTopkOptions(k=2.0, weights="shifted", min_keep=1, renormalize=renormalize)
    r = StatTopkRouter(RouterSpec(d_model=E, num_experts=E, options=opts)).train()
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[:, 0] = torch.tensor([0.0] * 15 + [-10.0])
    x = torch.eye(E)[0].expand(4, E).clone()  # every token's logits: [0] * 15 + [-10]
    out = r(x, ctx())
    assert out.expert_idx_P.tolist() == [0, 0, 0, 0]
    p0 = torch.softmax(torch.tensor([0.0] * 15 + [-10.0]), -1)[0]
    torch.testing.assert_close(out.weight_P.detach(), torch.full((4,), 1.0 if renormalize else float(p0)))
    out.weight_P.sum().backward()
    assert (r.gate.weight.grad.abs().sum() > 0) != renormalize  # a lone renormalised expert: weight 1


@pytest.mark.parametrize("min_keep", [1, 2])
@pytest.mark.parametrize("dist", ["normal", "cauchy"])
def test_stat_topk_shifted_weights_follow_the_formula_and_are_never_zero(dist, min_keep):
    """Heavy-tailed logit rows often leave fewer than min_keep experts above theta. Rows with enough
    survivors keep Spark's ReLU(z - theta), the others take p; with min_keep = 1 the kept expert is the
    token's best, so p >= 1/E: never 0 (it was for 42 of 4096 Gaussian and 852 of 4096 Cauchy rows)."""
    E, T = 16, 4096
    opts = StatTopkOptions(k=2.0, weights="shifted", min_keep=min_keep)
    r = StatTopkRouter(RouterSpec(d_model=E, num_experts=E, options=opts)).train()
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(T, E, generator=g) if dist == "normal" else torch.empty(T, E).cauchy_(generator=g)
    out = r(z, ctx())
    assert (torch.bincount(out.token_idx_P, minlength=T) >= min_keep).all()
    w = dense(out, T, E)
    quantile = statistics.NormalDist().inv_cdf(1 - 2 / E)
    theta = z.mean(-1, keepdim=True) + z.std(-1, keepdim=True, unbiased=False) * quantile
    enough = (z > theta).sum(-1) >= min_keep
    assert enough.any() and (~enough).any()
    kept = torch.zeros(T, E, dtype=torch.bool)
    kept[out.token_idx_P, out.expert_idx_P] = True
    torch.testing.assert_close(w[enough], (torch.relu(z - theta) * kept)[enough])
    torch.testing.assert_close(w[~enough], (torch.softmax(z, -1) * kept)[~enough])
    if min_keep == 1:
        assert (out.weight_P > 0).all()


# ---------------------------------------------------------------------------------------------- act DTS
def test_act_dts_identity_is_the_dts_gate():
    x = torch.randn(20, D)
    a = make(ActDTSRouter, ActDTSOptions(activation="identity", balance="none"), E=4)
    with torch.no_grad():
        a.gate.linear.weight.normal_()
    b = make(DTSRouter, DTSOptions(), E=4)
    b.gate.weight.data.copy_(a.gate.linear.weight.data)
    for c in (ctx(tau=0.7), ctx(hard=True)):
        torch.manual_seed(5)
        ra = a(x, c)
        torch.manual_seed(5)
        rb = b(x, c)
        torch.testing.assert_close(dense(ra, 20, 4), dense(rb, 20, 4))


def test_act_dts_tanh_bounds_scores_and_goes_top1_at_eval():
    r = make(ActDTSRouter, ActDTSOptions(), E=4)
    with torch.no_grad():
        r.gate.linear.weight.normal_().mul_(100)
    a = r.gate(torch.randn(10, D))
    assert a.abs().max() <= 1.0
    out = r.eval()(torch.randn(10, D), ctx())
    assert out.fixed_k == 1 and out.token_idx_P.numel() == 10


# ------------------------------------------------------------------------------------- BlockFFN, ReMoE
def test_blockffn_relu_rms_routing_and_losses():
    r = make(BlockFFNRouter, BlockFFNOptions(), E=8)
    x = torch.randn(24, D)
    out = r(x, ctx(shape=(2, 12)))
    s = r.gate(x)
    assert torch.equal((s > 0).sum(), torch.tensor(out.token_idx_P.numel()))  # exactly the positive scores
    a = torch.relu(s)
    torch.testing.assert_close(dense(out, 24, 8), a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert 0 < out.aux["chunk"] <= 1 and out.aux["locality"] > 0


def test_adaptive_coefficient_rises_with_the_loss_and_is_capped():
    o = BlockFFNOptions(stable_steps=2, window_steps=2)
    c = AdaptiveCoefficient(0.05, o)
    for loss in [1.0, 1.0, 1.0, 1.0, 2.0, 2.0] + [100.0] * 20:
        c.observe(torch.tensor(loss))
        c.on_step()
    assert c.value() == pytest.approx(0.05 * 4.0)  # capped at max_factor
    d = AdaptiveCoefficient(0.05, o)
    for loss in [1.0] * 4 + [1.01] * 2:
        d.observe(torch.tensor(loss))
        d.on_step()
    assert float(d.target) == pytest.approx(0.05 * 1.025)  # a small rise moves it by min_ratio


def test_remoe_lambda_grows_while_dense_and_shrinks_when_sparse():
    assert adapt_lambda(1.0, 1.2, 0.75, 0.5) == pytest.approx(1.2)
    assert adapt_lambda(1.0, 1.2, 0.75, 0.9) == pytest.approx(1 / 1.2)
    r = make(ReMoERouter, ReMoEOptions(k=1), E=4)
    x = torch.randn(32, D)
    out = r(x, ctx())  # about half the experts on: denser than 1 of 4
    assert out.token_idx_P.numel() > 32
    torch.testing.assert_close(dense(out, 32, 4), torch.relu(r.gate(x)))
    r.on_step(0)
    assert float(r.lam) == pytest.approx(1e-8 * 1.2)
    assert r.loss_weights()["l1"] == pytest.approx(1e-8 * 1.2)


def remoe_layers(scope: str) -> list[ReMoERouter]:
    """Two ReMoE layers built as a model builds them (``link`` once both exist): layer 0 dense (most
    logits positive), layer 1 sparse (most negative)."""
    routers = [make(ReMoERouter, ReMoEOptions(k=1, lambda_scope=scope), E=4, layer=i) for i in range(2)]
    for r, shift in zip(routers, (0.2, -0.2)):
        r.gate.weight.data.add_(shift)  # every logit moves by shift * sum(x)
    for r in routers:
        r.link(routers)
    return routers


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_remoe_lambda_per_layer_or_one_for_the_model(scope):
    """``layer``: each lambda follows its own layer's sparsity (here one rises, one falls); ``model`` (the
    source's): one lambda, moved by the sparsity of the layers' pairs together."""
    routers = remoe_layers(scope)
    x = torch.ones(32, D) + 0.1 * torch.randn(32, D)
    pairs = [int(r(x, ctx()).token_idx_P.numel()) for r in routers]
    assert pairs[0] > 32 > pairs[1]  # layer 0 denser than 1 of 4 experts, layer 1 sparser
    for r in routers:
        r.on_step(0)
    lams = [float(r.lam) for r in routers]
    if scope == "layer":
        assert lams == pytest.approx([1e-8 * 1.2, 1e-8 / 1.2])
    else:
        want = adapt_lambda(1e-8, 1.2, 0.75, 1.0 - sum(pairs) / (2 * 32 * 4))
        assert lams == pytest.approx([want, want]) and want != 1e-8
    assert all(float(r.step_pairs) == 0 and float(r.step_slots) == 0 for r in routers)


def test_remoe_model_scope_links_every_layer_of_a_spawned_model():
    from evomoe.evolve import spawn_model
    from evomoe.models import GPT

    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 30, 16, 3, 2, 8, 32
    cfg.router.name = "remoe"
    cfg.router.remoe.lambda_scope = "model"
    model = GPT(m, cfg.moe)
    spawn_model(model, cfg, torch.Generator().manual_seed(0))
    routers = [layer.router for layer in model.moe_layers()]
    assert len(routers) == 3 and all(r.group == routers for r in routers)
    assert all(
        set(r.state_dict())
        == {"gate.weight", "lam", "step_pairs", "step_slots", "balancer.bias_E", "balancer.step_counts_E"}
        for r in routers
    )


# ---------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "cls,opts",
    [
        (CometRouter, CometOptions(perm_steps=2)),
        (ReMoERouter, ReMoEOptions()),
        (BlockFFNRouter, BlockFFNOptions(stable_steps=1, window_steps=1)),
        (SigmaRouter, SigmaOptions(bias_rate=0.01)),
    ],
)
def test_step_state_survives_a_state_dict_round_trip(cls, opts):
    r = make(cls, opts, E=4)
    x = torch.randn(16, D)
    for s in range(3):
        r(x, ctx(step=s, shape=(2, 8)))
        r.on_step(s)
    r2 = make(cls, opts, E=4, seed=1)
    r2.load_state_dict(r.state_dict())
    assert r.loss_weights() == r2.loss_weights()
    a, b = r.eval()(x, ctx(step=3)), r2.eval()(x, ctx(step=3))
    torch.testing.assert_close(dense(a, 16, 4), dense(b, 16, 4))


def test_tables_of_unselected_routers_need_not_fit_the_expert_count():
    cfg = Config()
    cfg.moe.num_experts = 1  # dselect_k / comet default to k = 2: fine while another router is chosen
    validate(cfg)
    cfg.router.name = "comet"
    with pytest.raises(ConfigError, match=r"router\.comet\.k = 2"):
        validate(cfg)
