"""The small-MoE recipe's router options: the top-1 output scale of the top-k router, dts_plus's cap_end and
distillation, and evolve.narrow_scale."""

from __future__ import annotations

import pytest
import torch
from test_routers import topk  # the top-k router with an identity gate (input rows are the logits)

from evomoe.config import router_config
from evomoe.moe.router import GateState, RouterContext


def weights_and_grad(how: str, z: torch.Tensor, upstream: torch.Tensor):
    z = z.clone().requires_grad_(True)
    routing = topk(z.shape[1], k=1, top1_weight=how)(z, RouterContext(gate=GateState()))
    (routing.weight_P * upstream).sum().backward()
    return routing.weight_P.detach(), z.grad


def test_top1_weight_values_and_gradients_against_their_definitions():
    torch.manual_seed(0)
    T, E = 6, 4
    z, up = torch.randn(T, E), torch.randn(T)
    first = z.argmax(-1)
    p_T = torch.softmax(z, -1)[torch.arange(T), first]

    w, g = weights_and_grad("prob", z, up)
    torch.testing.assert_close(w, p_T)  # Switch: the gate probability
    zr = z.clone().requires_grad_(True)
    (torch.softmax(zr, -1)[torch.arange(T), first] * up).sum().backward()
    torch.testing.assert_close(g, zr.grad)

    w, g = weights_and_grad("straight_through", z, up)
    torch.testing.assert_close(w, torch.ones(T))  # the expert's full output ...
    torch.testing.assert_close(g, zr.grad)  # ... and the gradient of p

    w, g = weights_and_grad("normalized", z, up)
    torch.testing.assert_close(w, torch.ones(T))
    zl = z.clone().requires_grad_(True)
    (torch.log_softmax(zl, -1)[torch.arange(T), first] * up).sum().backward()
    torch.testing.assert_close(g, zl.grad)  # the gradient of log p


def test_top1_weight_is_checked_and_exports_as_a_renormalised_top1():
    from evomoe.config import ConfigError, load_config  # noqa: PLC0415

    with pytest.raises(ConfigError, match=r"router\.topk\.top1_weight"):
        load_config("tiny", ["--router.name=topk", "--router.topk.top1_weight=ones"])
    assert topk(4, k=1).export_routing(True) == (1, False)
    assert topk(4, k=1, top1_weight="normalized").export_routing(True) == (1, True)
    assert topk(4, k=2).export_routing(True) == (2, True)


# ------------------------------------------------------------------ EvoMoE ending in fine-grained top-k
D, E = 16, 8


def dts_plus(**opts):
    from evomoe.moe.routers.dts_plus import DTSPlusRouter  # noqa: PLC0415

    cfg = router_config(gate_init="normal")
    for k, v in opts.items():
        setattr(cfg.dts_plus, k, v)
    torch.manual_seed(0)
    return DTSPlusRouter.from_config(cfg, D, E).train()


def pairs_of(routing) -> set[tuple[int, int]]:
    return set(zip(routing.token_idx_P.tolist(), routing.expert_idx_P.tolist(), strict=True))


def test_cap_falls_to_cap_end():
    from evomoe.moe.routers.dts_plus import cap_at  # noqa: PLC0415

    assert [cap_at(8, p, 2) for p in (0.0, 0.5, 1.0, 3.0)] == [8, 5, 2, 2]
    assert cap_at(8, 1.0) == 1  # the default end: top-1


@pytest.mark.parametrize("hard_noise", [False, True])
def test_cap_end_routes_k_experts_in_the_hard_phase_and_at_evaluation(hard_noise):
    r = dts_plus(cap_start=4, cap_end=2, normalize=True, hard_noise=hard_noise)
    T = 64
    x = torch.randn(T, D)
    z = r.gate(x).detach()
    top2 = {(t, int(e)) for t in range(T) for e in z[t].topk(2).indices}  # the reference: torch.topk
    r.eval()
    ev = r(x, RouterContext(gate=GateState(tau=0.3, hard=True)))
    assert pairs_of(ev) == top2 and ev.fixed_k == 2
    p = torch.softmax(z, -1)
    want = p[ev.token_idx_P, ev.expert_idx_P] / p.gather(1, z.topk(2).indices).sum(-1)[ev.token_idx_P]
    torch.testing.assert_close(ev.weight_P.detach(), want)  # renormalised over the two
    r.train()
    torch.manual_seed(3)
    hard = r(x, RouterContext(gate=GateState(tau=0.3, hard=True)))
    assert torch.bincount(hard.token_idx_P, minlength=T).tolist() == [2] * T
    assert (pairs_of(hard) == top2) != hard_noise  # without noise: the evaluated experts; with: sampled
    masked = r(x, RouterContext(gate=GateState(tau=0.3, hard=True), valid_T=torch.ones(T, dtype=torch.bool)))
    assert torch.bincount(masked.token_idx_P, minlength=T).tolist() == [2] * T  # the mask path agrees
    assert r.export_routing(True) == (2, True)


def test_soft_phase_cap_never_falls_below_cap_end():
    r = dts_plus(cap_start=6, cap_end=3)
    x = torch.randn(256, D)
    routing = r(x, RouterContext(gate=GateState(tau=3.0, progress=1.0)))
    k_T = torch.bincount(routing.token_idx_P, minlength=256)
    assert k_T.max() == 3 and (k_T == 3).float().mean() > 0.9


def test_cap_end_is_checked():
    from evomoe.config import ConfigError, load_config  # noqa: PLC0415

    base = ["--router.name=dts_plus", "--router.dts_plus.cap_start=2"]
    with pytest.raises(ConfigError, match=r"router\.dts_plus\.cap_end = 3: must be <= "):
        load_config("tiny", base + ["--router.dts_plus.cap_end=3"])
    with pytest.raises(ConfigError, match=r"router\.dts_plus\.cap_end = 0"):
        load_config("tiny", base + ["--router.dts_plus.cap_end=0"])
    with pytest.raises(ConfigError, match=r"evolve\.narrow_scale"):
        load_config("tiny", ["--evolve.narrow_scale=sum"])


@pytest.mark.parametrize("E_,width", [(4, 0.5), (8, 0.25), (3, 0.5)])
def test_narrow_scale_mean_makes_the_experts_mean_the_dense_ffn(E_, width):
    """Spawned from the dense FFN (copy), fine-grained experts whose mean is the dense FFN, so a normalised
    gate over every expert (the soft phase's start) computes the dense layer; E 3 x width 1/2 holds some
    units twice and some once (uneven)."""
    from evomoe.config import Config  # noqa: PLC0415
    from evomoe.evolve import spawn_layer  # noqa: PLC0415
    from evomoe.moe.layer import MoELayer  # noqa: PLC0415

    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.n_layers = D, 32, 2
    cfg.moe.num_experts, cfg.moe.expert_width = E_, width
    cfg.router.name, cfg.router.gate_init = "dts_plus", "zeros"
    cfg.router.dts_plus.threshold, cfg.router.dts_plus.normalize = 0.0, True
    torch.manual_seed(0)
    x = torch.randn(2, 6, D)
    outs = {}
    for scale in ("mean", "none"):
        cfg.evolve.narrow_scale = scale
        torch.manual_seed(0)
        layer = MoELayer(D, 32, "gelu", "loop", 2)
        dense = layer.forward_dense(x.view(-1, D)).view(2, 6, D)
        spawn_layer(layer, cfg, torch.Generator().manual_seed(0), layer_idx=0)
        layer.router.train()
        out, _, stats = layer(x, RouterContext(gate=GateState(tau=2.0), shape=(2, 6)))
        assert int(stats.pairs) == 12 * E_  # every expert selected, weights 1/E
        outs[scale] = out
    torch.testing.assert_close(outs["mean"], dense, atol=1e-7, rtol=1e-4)  # outputs of size ~1e-3
    assert (outs["none"] - dense).abs().max() > 0.2 * dense.abs().max()  # without the scale: a fraction


# ------------------------------------------------------------------ the DTS routing distilled into the token
def distilling(V: int = 20, **opts):
    from evomoe.moe.router import RouterSpec  # noqa: PLC0415
    from evomoe.moe.routers.dts_plus import DTSPlusRouter  # noqa: PLC0415

    cfg = router_config(gate_init="normal")
    cfg.dts_plus.distill_weight, cfg.dts_plus.normalize = 0.5, True
    for k, v in opts.items():
        setattr(cfg.dts_plus, k, v)
    torch.manual_seed(0)
    spec = RouterSpec(d_model=D, num_experts=E, options=cfg.dts_plus, gate_init="normal", vocab_size=V)
    return DTSPlusRouter(spec).train()


def test_distillation_loss_before_the_switch_trains_only_the_token_router():
    r = distilling()
    ids = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(40, D, requires_grad=True)
    routing = r(x, RouterContext(gate=GateState(tau=1.0), token_ids_T=ids))
    want = torch.nn.functional.cross_entropy(r.distilled(ids), r.gate(x).argmax(-1))
    torch.testing.assert_close(routing.aux["distill"], want)
    assert r.loss_weights()["distill"] == 0.5
    r.zero_grad()
    routing.aux["distill"].backward()
    assert r.gate.weight.grad is None and x.grad is None  # the target is the gate's choice, detached
    assert r.distilled.embed.weight.grad.abs().sum() > 0
    r.eval()  # at evaluation before the switch: the gate's top-1, no distillation loss
    ev = r(x, RouterContext(gate=GateState(tau=1.0), token_ids_T=ids))
    assert ev.expert_idx_P.tolist() == r.gate(x).argmax(-1).tolist() and float(ev.aux["distill"]) == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_after_the_switch_the_frozen_token_router_selects(training):
    r = distilling(cap_end=2, cap_start=2)
    r.train(training)
    ids = torch.randint(0, 20, (60,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(60, D)
    routing = r(x, RouterContext(gate=GateState(tau=0.3, hard=True), token_ids_T=ids))
    logits = r.distilled(ids)
    want = {(t, int(e)) for t in range(60) for e in logits[t].topk(2).indices}
    assert pairs_of(routing) == want  # a function of the token id alone
    assert float(routing.aux["distill"]) == 0.0
    routing.weight_P.sum().backward()
    assert r.distilled.embed.weight.grad is None  # frozen
    with pytest.raises(ValueError, match="distill_weight"):
        r.export_routing(True)


def test_the_token_router_learns_the_gates_routing():
    """A gate whose choice is a function of the token (x = the token's embedding): after some Adam steps on
    the distillation loss alone, the token router picks the gate's expert for nearly every token."""
    r = distilling(V=30)
    table = torch.randn(30, D, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(r.distilled.parameters(), lr=0.05)
    for step in range(150):
        ids = torch.randint(0, 30, (64,), generator=torch.Generator().manual_seed(step))
        loss = r(table[ids], RouterContext(gate=GateState(tau=1.0), token_ids_T=ids)).aux["distill"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = torch.arange(30)
    agree = (r.distilled(ids).argmax(-1) == r.gate(table).argmax(-1)).float().mean()
    assert agree > 0.9
