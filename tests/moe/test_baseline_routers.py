"""The baseline routers of spec section 5: BASE layers, hash layers, StableMoE."""

from __future__ import annotations

import math

import pytest
import torch

from evomoe.config import load_config, router_config
from evomoe.evolve import spawn_model
from evomoe.models import GPT
from evomoe.moe.dispatcher import moe_reference
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import GateState, RouterContext
from evomoe.moe.routers.base_layers import BaseLayerRouter
from evomoe.moe.routers.hash import HashRouter, balanced_hash_map, hash_loads, random_hash_map
from evomoe.moe.routers.stablemoe import StableMoERouter, distill_loss, stablemoe_balance_loss
from evomoe.ops.auction import assignment_score, balanced_assignment_reference
from evomoe.registry import ROUTERS
from evomoe.tasks.lm import lm_forward
from evomoe.train.optim import build_optimizer

V, E, D = 64, 4, 16


def zipf_counts(vocab: int, s: float = 1.0, total: float = 1e6) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    return (total / ranks**s / (1 / ranks**s).sum()).round().long()


def gate_in_stage(stage: int) -> GateState:
    """A step in StableMoE's stage 1 or 2 of a 100-step run (stage 1: its first 10 steps)."""
    return GateState(step=0 if stage == 1 else 50, spawn_step=0, total_steps=100)


def ctx_for(ids_T: torch.Tensor, stage: int = 1, valid_T: torch.Tensor | None = None) -> RouterContext:
    return RouterContext(gate=gate_in_stage(stage), token_ids_T=ids_T, valid_T=valid_T)


def check_contract(routing, T: int) -> None:
    assert routing.token_idx_P.dtype == torch.long and routing.expert_idx_P.dtype == torch.long
    assert routing.weight_P.is_floating_point()
    assert routing.token_idx_P.shape == routing.expert_idx_P.shape == routing.weight_P.shape
    assert bool((routing.token_idx_P < T).all()) and bool((routing.expert_idx_P < E).all())


def tiny_gpt(name: str, seed: int = 0, extra: list[str] | None = None):
    torch.manual_seed(seed)
    cfg = load_config("tiny", ["--model.vocab_size=256", f"--router.name={name}", *(extra or [])])
    model = GPT(cfg.model, cfg.moe)
    counts = zipf_counts(256)
    spawn_model(model, cfg, torch.Generator().manual_seed(seed), vocab_size=256, token_counts=counts)
    return cfg, model


def test_routers_are_registered():
    for name in ("base", "hash", "stablemoe"):
        assert name in ROUTERS.names()


@pytest.mark.parametrize("name", ["base", "hash", "stablemoe"])
def test_layer_output_matches_reference(name):
    torch.manual_seed(0)
    cfg = router_config(name=name)
    router = ROUTERS.get(name).from_config(cfg, D, E, vocab_size=V, token_counts=zipf_counts(V))
    layer = MoELayer(D, 32, "gelu")
    layer.experts = type(layer.experts)(E, D, 32, "gelu")
    torch.nn.init.normal_(layer.experts.w1_EDH, std=0.2)
    torch.nn.init.normal_(layer.experts.w2_EFD, std=0.2)
    layer.router = router
    x = torch.randn(2, 8, D)
    ids = torch.randint(0, V, (16,))
    out, routing, stats = layer(x, ctx_for(ids))
    check_contract(routing, 16)
    assert routing.token_idx_P.tolist() == list(range(16))  # top-1: one pair per token
    ref = moe_reference(x.reshape(16, D), routing, layer.experts)
    torch.testing.assert_close(out.reshape(16, D), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- BASE


def base_router(seed: int = 0) -> BaseLayerRouter:
    torch.manual_seed(seed)
    return BaseLayerRouter.from_config(router_config(name="base"), D, E)


def test_base_centroids_are_orthogonal_with_gain():
    c = base_router().centroids.weight.detach()
    torch.testing.assert_close(c @ c.t(), 0.01 * torch.eye(E), atol=1e-6, rtol=0)


def test_base_training_is_balanced_and_near_optimal():
    router = base_router().train()
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(1))
    x[:, :] += 3 * router.centroids.weight.detach()[0] / 0.1  # every token prefers expert 0
    routing = router(x, RouterContext())
    check_contract(routing, 24)
    assert torch.bincount(routing.expert_idx_P, minlength=E).tolist() == [6] * E
    a = (x @ router.centroids.weight.t()).detach()
    best = assignment_score(a, balanced_assignment_reference(a))
    eps = 1e-3 * float(a.max() - a.min())
    assert assignment_score(a, routing.expert_idx_P) >= best - 24 * eps
    assert routing.aux == {}


def test_base_eval_is_greedy_top1():
    router = base_router().eval()
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(2))
    routing = router(x, RouterContext())
    a = x @ router.centroids.weight.detach().t()
    assert routing.expert_idx_P.tolist() == a.argmax(-1).tolist()
    torch.testing.assert_close(routing.weight_P, torch.sigmoid(a.max(-1).values))


def test_base_centroids_learn_only_through_the_sigmoid_weight():
    router = base_router().train()
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    routing = router(x, RouterContext())
    assert not routing.expert_idx_P.requires_grad and not routing.probs_TE.requires_grad
    routing.weight_P.sum().backward()
    c = router.centroids.weight.detach()
    a_P = (x.detach()[routing.token_idx_P] * c[routing.expert_idx_P]).sum(-1)
    ds_P = torch.sigmoid(a_P) * (1 - torch.sigmoid(a_P))
    expected = torch.zeros(E, D).index_add_(
        0, routing.expert_idx_P, ds_P[:, None] * x.detach()[routing.token_idx_P]
    )
    torch.testing.assert_close(router.centroids.weight.grad, expected, atol=1e-6, rtol=1e-5)
    assert x.grad is not None


def test_base_padding_is_not_routed_or_balanced():
    router = base_router().train()
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(4))
    valid = torch.ones(20, dtype=torch.bool)
    valid[[1, 5, 9, 13]] = False
    routing = router(x, RouterContext(valid_T=valid))
    assert sorted(routing.token_idx_P.tolist()) == valid.nonzero().squeeze(1).tolist()
    assert torch.bincount(routing.expert_idx_P, minlength=E).tolist() == [4] * E


def test_base_in_gpt_trains_and_balances():
    cfg, model = tiny_gpt("base")
    idx = torch.randint(0, 256, (4, 30), generator=torch.Generator().manual_seed(0))  # T = 120
    out = lm_forward(model, idx, idx)
    assert [s.counts_E.tolist() for s in out.stats] == [[30] * E] * 2
    out.loss.backward()
    assert all(layer.router.centroids.weight.grad is not None for layer in model.moe_layers())


# ---------------------------------------------------------------------------------------------- hash


def test_hash_random_map_is_seeded_even_and_per_layer():
    a, b = random_hash_map(1000, 8, seed=5), random_hash_map(1000, 8, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_hash_map(1000, 8, seed=6))
    assert torch.bincount(a, minlength=8).tolist() == [125] * 8
    cfg = router_config(name="hash")
    cfg.hash.mode = "random"
    r0 = HashRouter.from_config(cfg, D, E, vocab_size=V, layer_idx=0)
    assert torch.equal(
        r0.expert_of_token, HashRouter.from_config(cfg, D, E, vocab_size=V, layer_idx=0).expert_of_token
    )
    assert not torch.equal(
        r0.expert_of_token, HashRouter.from_config(cfg, D, E, vocab_size=V, layer_idx=1).expert_of_token
    )


def test_hash_balanced_map_evens_out_zipf_loads():
    counts = zipf_counts(4096)
    m = balanced_hash_map(counts, 8)
    assert torch.equal(m, balanced_hash_map(counts, 8))
    loads = hash_loads(m, counts, 8).double()
    assert float(loads.max() / loads.mean()) < 1.01
    rand = hash_loads(random_hash_map(4096, 8, 0), counts, 8).double()
    assert float(loads.max() - loads.min()) < float(rand.max() - rand.min())
    assert int(m[0]) == 0  # the most frequent id goes first, to the lowest expert


def test_hash_balanced_spreads_unseen_ids():
    counts = torch.zeros(40, dtype=torch.long)
    counts[:4] = torch.tensor([10, 9, 8, 7])
    m = balanced_hash_map(counts, 4)
    assert m[:4].tolist() == [0, 1, 2, 3]
    assert torch.bincount(m[4:], minlength=4).tolist() == [9] * 4


def test_hash_routing_is_fixed_and_identical_in_train_and_eval():
    router = HashRouter.from_config(
        router_config(name="hash"), D, E, vocab_size=V, token_counts=zipf_counts(V)
    )
    ids = torch.randint(0, V, (32,), generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, D)
    train = router.train()(x, ctx_for(ids))
    ev = router.eval()(torch.randn(32, D), ctx_for(ids))
    check_contract(train, 32)
    assert torch.equal(train.expert_idx_P, ev.expert_idx_P)
    assert torch.equal(train.expert_idx_P, router.expert_of_token[ids])
    assert train.weight_P.tolist() == [1.0] * 32
    assert list(router.parameters()) == []


def test_hash_map_is_saved_in_the_state_dict():
    cfg = router_config(name="hash")
    cfg.hash.mode = "random"
    a = HashRouter.from_config(cfg, D, E, vocab_size=V)
    cfg.hash.seed = 99
    b = HashRouter.from_config(cfg, D, E, vocab_size=V)
    assert "expert_of_token" in a.state_dict()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.expert_of_token, b.expert_of_token)


def test_hash_clear_errors():
    with pytest.raises(ValueError, match="token_counts"):
        HashRouter.from_config(router_config(name="hash"), D, E, vocab_size=V)
    router = HashRouter.from_config(
        router_config(name="hash"), D, E, vocab_size=V, token_counts=zipf_counts(V)
    )
    with pytest.raises(ValueError, match="token ids"):
        router(torch.randn(4, D), RouterContext())
    with pytest.raises(ValueError, match="vocabulary"):
        HashRouter.from_config(
            router_config(name="hash"), D, E, vocab_size=V, token_counts=zipf_counts(2 * V)
        )


def test_hash_in_gpt_trains_the_experts():
    cfg, model = tiny_gpt("hash")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False
    out = lm_forward(model, idx, idx, valid_BS=valid)
    assert [int(s.pairs) for s in out.stats] == [26, 26]
    out.loss.backward()
    assert all(layer.experts.w1_EDH.grad is not None for layer in model.moe_layers())


# ---------------------------------------------------------------------------------------------- StableMoE


def stablemoe_router(seed: int = 0) -> StableMoERouter:
    torch.manual_seed(seed)
    return StableMoERouter.from_config(router_config(name="stablemoe"), D, E, vocab_size=V)


def test_stablemoe_balance_loss_on_a_hand_example():
    a = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    expert = a.argmax(-1)  # [0, 0, 0, 1]: |A_0| = 3, |A_1| = 1, n = 2
    s = lambda v: 1 / (1 + math.exp(-v))
    expected = ((3 - 2) / 2 * (s(2) + s(1) + s(3)) + (1 - 2) / 2 * s(1)) / 4
    assert float(stablemoe_balance_loss(a, expert)) == pytest.approx(expected, rel=1e-6)
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expected_ce = (-math.log(math.e / (math.e + 1)) - math.log(1 / (1 + math.e**2))) / 2
    assert float(distill_loss(logits, torch.tensor([0, 0]))) == pytest.approx(expected_ce, rel=1e-6)


def test_stablemoe_stage1_routing_and_losses():
    router = stablemoe_router().train()
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(1))
    routing = router(x, ctx_for(ids, stage=1))
    check_contract(routing, 12)
    a = x @ router.centroids.weight.detach().t()
    assert routing.expert_idx_P.tolist() == a.argmax(-1).tolist()
    torch.testing.assert_close(routing.weight_P.detach(), torch.sigmoid(a.max(-1).values))
    torch.testing.assert_close(routing.aux["balance"], stablemoe_balance_loss(a, a.argmax(-1)))
    d_logits = router.distilled(ids).detach()
    torch.testing.assert_close(routing.aux["distill"], distill_loss(d_logits, a.argmax(-1)))
    assert router.loss_weights() == {"balance": 0.3, "distill": 0.3}
    (routing.aux["balance"] + routing.aux["distill"]).backward()
    assert router.centroids.weight.grad is not None
    assert router.distilled.embed.weight.grad is not None


def test_stablemoe_distillation_learns_the_routing():
    router = stablemoe_router().train()
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(48)
    opt = torch.optim.SGD(router.distilled.parameters(), lr=2.0)
    losses = []
    for _ in range(30):
        loss = router(x, ctx_for(ids, stage=1)).aux["distill"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    router.eval()
    target = (x @ router.centroids.weight.detach().t()).argmax(-1)
    agree = (router(x, ctx_for(ids)).expert_idx_P == target).float().mean()
    assert float(agree) > 0.9


def test_stablemoe_stage2_and_eval_use_the_distilled_router():
    router = stablemoe_router().train()
    x = torch.randn(10, D, requires_grad=True)
    ids = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(2))
    expected = router.distilled(ids).argmax(-1).tolist()
    routing = router(x, ctx_for(ids, stage=2))
    assert routing.expert_idx_P.tolist() == expected
    assert float(routing.aux["balance"]) == 0.0 and float(routing.aux["distill"]) == 0.0
    routing.weight_P.sum().backward()
    assert router.centroids.weight.grad is not None
    assert router.distilled.embed.weight.grad is None and router.distilled.centroids.grad is None
    router.eval()
    assert router(x, ctx_for(ids, stage=1)).expert_idx_P.tolist() == expected
    with pytest.raises(ValueError, match="token ids"):
        router(x, RouterContext())


def capture_routings(model) -> list:
    seen: list = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda m, args, out: seen.append(out.expert_idx_P.clone()))
    return seen


def train_steps(model, opt, batches, stage: int) -> None:
    for idx in batches:
        out = lm_forward(model, idx, idx, gate=gate_in_stage(stage))
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_stablemoe_stage2_freezes_the_distilled_router_in_a_gpt():
    cfg, model = tiny_gpt("stablemoe")
    model.train()
    opt = build_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 32), generator=g) for _ in range(4)]
    train_steps(model, opt, batches[:2], stage=1)  # the distilled router now has AdamW moments
    routers = [layer.router for layer in model.moe_layers()]
    assert all(r.distilled.embed.weight in opt.state for r in routers)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".distilled." in n}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".router.centroids" in n}
    fixed = batches[3]
    seen = capture_routings(model)
    model(fixed, gate=gate_in_stage(2))
    before = [t.clone() for t in seen]
    train_steps(model, opt, batches, stage=2)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        if name in others:
            assert not torch.equal(p, others[name]), name  # centroids keep training
    seen.clear()
    model(fixed, gate=gate_in_stage(2))
    assert all(torch.equal(b, a) for b, a in zip(before, seen, strict=True))
    seen.clear()
    model.eval()
    model(fixed, gate=gate_in_stage(1))
    assert all(torch.equal(b, a) for b, a in zip(before, seen, strict=True))  # eval: the distilled router
    ids = fixed.reshape(-1)
    assert all(torch.equal(s, r.distilled(ids).argmax(-1)) for s, r in zip(seen, routers, strict=True))
