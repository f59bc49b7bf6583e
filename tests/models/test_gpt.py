"""The GPT model itself: causality (dense and after the spawn), ``moe_every > 1``, untied weights, and how
the aux losses of several MoE layers are averaged and weighted into ``aux_loss``."""

from __future__ import annotations

import pytest
import torch

from evomoe.config import Config
from evomoe.evolve import spawn_model
from evomoe.models import GPT
from evomoe.moe.router import GateState
from evomoe.tasks.lm import lm_forward


def tiny(n_layers: int = 2, moe_every: int = 1, tie: bool = True, router: str = "dts") -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 17, 16, n_layers, 2, 8, 24
    m.moe_every, m.tie_weights = moe_every, tie
    cfg.moe.num_experts = 4
    cfg.router.name = router
    cfg.router.gate_init = "normal"
    cfg.evolve.noise = 0.2
    return cfg


def build(cfg: Config, spawned: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    if spawned:
        spawn_model(model, cfg, torch.Generator().manual_seed(1), vocab_size=cfg.model.vocab_size)
    return model


@pytest.mark.parametrize("spawned", [False, True])
def test_a_token_never_sees_the_future(spawned):
    model = build(tiny(), spawned).eval()  # evaluation routing is per token (top-1, no noise)
    x = torch.randint(0, 17, (2, 8), generator=torch.Generator().manual_seed(2))
    base = model(x, gate=GateState(tau=0.5, hard=True)).logits
    for j in (3, 7):
        changed = x.clone()
        changed[:, j] = (changed[:, j] + 1) % 17
        out = model(changed, gate=GateState(tau=0.5, hard=True)).logits
        # the past: the same (bitwise when dense; after the spawn a changed token can move other rows
        # within an expert's matmul, so only rounding may differ)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6 if spawned else 0)
        assert (out[:, j:] - base[:, j:]).abs().max() > 1e-4  # the token itself and the future do change


def test_moe_every_places_moe_in_every_kth_block_and_only_those_spawn():
    cfg = tiny(n_layers=4, moe_every=2)
    model = build(cfg, spawned=True)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert [b.ffn.experts.num_experts for b in model.blocks] == [1, 4, 1, 4]
    assert [b.ffn.router is not None for b in model.blocks] == [False, True, False, True]
    out = model(torch.randint(0, 17, (2, 8)), gate=GateState(tau=2.0))
    assert len(out.stats) == 2 and all(int(s.tokens) == 16 for s in out.stats)


def test_untied_head_is_its_own_parameter():
    tied, untied = build(tiny(tie=True), False), build(tiny(tie=False), False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == 17 * 16  # one more V x D matrix
    x = torch.randint(0, 17, (2, 8))
    lm_forward(untied, x, x).loss.backward()
    emb_grad_rows = untied.tok_emb.weight.grad.abs().sum(1) > 0
    assert int(emb_grad_rows.sum()) == len(set(x.flatten().tolist()))  # only the input tokens' rows
    assert bool((untied.lm_head.weight.grad.abs().sum(1) > 0).all())  # the head: every row


def test_aux_losses_are_averaged_over_moe_layers_and_weighted_by_the_router():
    cfg = tiny(n_layers=3, router="topk")
    cfg.router.topk.aux_weight = 0.25
    model = build(cfg, spawned=True).train()
    per_layer = []
    for block in model.blocks:
        block.ffn.register_forward_hook(lambda mod, inp, out: per_layer.append(out[1].aux))
    torch.manual_seed(3)
    out = model(torch.randint(0, 17, (4, 8), generator=torch.Generator().manual_seed(4)))
    assert len(per_layer) == 3 and set(per_layer[0]) == set(out.aux) and out.aux
    for name in out.aux:
        mean = sum(layer_aux[name].float() for layer_aux in per_layer) / 3
        torch.testing.assert_close(out.aux[name], mean)
    weights = model.blocks[0].ffn.router.loss_weights()
    assert weights and max(weights.values()) == 0.25
    want = sum(weights.get(name, 0.0) * value for name, value in out.aux.items())
    torch.testing.assert_close(out.aux_loss, torch.as_tensor(want, dtype=torch.float32))
    assert float(out.aux_loss.detach()) > 0
