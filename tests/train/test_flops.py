"""The FLOP formula (``evomoe.train.flops``) against an independent count: torch's FlopCounterMode over a
real forward + backward of a tiny GPT (every matmul: projections, FFN rows, router, head), plus the causal
attention scores counted by hand position by position (the counter does not see CPU attention kernels)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from evomoe.config import Config
from evomoe.evolve import spawn_model
from evomoe.models import GPT
from evomoe.moe.router import GateState
from evomoe.tasks.lm import lm_forward
from evomoe.train.flops import training_flops


def causal_score_flops(B: int, S: int, D: int, L: int) -> int:
    """q.k over the visible keys and the weighted sum of values, 2 FLOPs per multiply-add, all heads."""
    return sum(B * L * 2 * (2 * D * visible) for visible in range(1, S + 1))


@pytest.mark.parametrize(
    "activation, moe_every, spawned", [("gelu", 1, False), ("swiglu", 2, True), ("gelu", 1, True)]
)
def test_training_flops_match_a_count_of_the_executed_matmuls(activation, moe_every, spawned):
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff = 13, 8, 2, 2, 6, 12
    m.activation, m.moe_every = activation, moe_every
    cfg.moe.num_experts, cfg.router.name, cfg.router.gate_init = 4, "dts", "normal"
    cfg.moe.experts_impl = "loop"  # the fused kernels write with mm(out=), which the counter does not see
    torch.manual_seed(0)
    model = GPT(m, cfg.moe).train()
    if spawned:
        spawn_model(model, cfg, torch.Generator().manual_seed(1), vocab_size=13)
    B, S = 3, 6
    x = torch.randint(0, 13, (B, S), generator=torch.Generator().manual_seed(2))
    with FlopCounterMode(display=False) as counter:
        out = lm_forward(
            model, x, x, gate=GateState(tau=2.0)
        )  # the soft phase: a variable number of pairs per token
        (out.loss + out.aux_loss).backward()
    counted = counter.get_total_flops() + 3 * causal_score_flops(B, S, m.d_model, m.n_layers)

    T = B * S
    pairs = sum(int(s.pairs) for s in out.stats)
    assert not spawned or pairs > T  # more than one expert per token: the pair count matters
    n_dense = m.n_layers - len(out.stats)
    routed = sum(int(s.tokens) for s in out.stats) if spawned else 0
    formula = training_flops(m, T, S, pairs + n_dense * T, routed, 4)
    assert formula == pytest.approx(counted, rel=1e-12)
