"""Experts with biases (imported GPT-2 / Llama mlp_bias MLPs): every matmul impl equals the ``loop``
reference, forward and backward; the fused impls, which have no bias term, refuse; the dense path
(one expert, before the spawn) equals the grouped path."""

from __future__ import annotations

import pytest
import torch

from evomoe.moe.experts import Experts
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import GateState, RouterContext


def biased(E: int, activation: str, impl: str) -> Experts:
    torch.manual_seed(0)
    ex = Experts(E, 8, 12, activation, impl, bias=True)
    with torch.no_grad():
        ex.b1_EH.normal_()
        ex.b2_ED.normal_()
    return ex


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("impl", ["padded", "auto"])
def test_biased_impls_match_loop(activation, impl):
    counts_E = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, requires_grad=True)
    ref, fast = biased(4, activation, "loop"), biased(4, activation, impl)
    y_ref, y = ref(x, counts_E), fast(x, counts_E)
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    (gx_ref, gb_ref), (gx, gb) = (
        torch.autograd.grad(o, (x, m.b1_EH), g) for o, m in ((y_ref, ref), (y, fast))
    )
    assert torch.allclose(gx, gx_ref, atol=1e-6) and torch.allclose(gb, gb_ref, atol=1e-6)
    assert gb_ref[1].abs().sum() == 0  # an expert without rows gets no bias gradient
    assert not torch.allclose(y_ref, Experts(4, 8, 12, activation, "loop")(x, counts_E))  # biases matter


def test_fused_impls_refuse_biases():
    with pytest.raises(ValueError, match="moe.experts_impl = 'fused' has no bias term"):
        Experts(2, 8, 12, "gelu", "fused", bias=True)


def test_dense_path_with_bias_equals_grouped_path():
    layer = MoELayer(8, 12, "gelu_tanh", "loop", bias=True)
    layer.experts = biased(1, "gelu_tanh", "loop")
    x = torch.randn(2, 5, 8)
    dense, _, _ = layer(x, RouterContext(gate=GateState()))
    grouped = layer.experts(x.reshape(10, 8), torch.tensor([10])).view(2, 5, 8)
    assert torch.allclose(dense, grouped, atol=1e-6)


def test_spawn_carries_biases():
    from evomoe.config import Config
    from evomoe.evolve import spawn_layer

    cfg = Config()
    cfg.moe.num_experts, cfg.evolve.spawn, cfg.evolve.ratio = 3, "mask", 0.5
    layer = MoELayer(8, 12, "gelu_tanh", "loop", bias=True)
    layer.experts = biased(1, "gelu_tanh", "loop")
    b1, b2 = layer.experts.b1_EH.detach().clone(), layer.experts.b2_ED.detach().clone()
    mapping = spawn_layer(layer, cfg, torch.Generator().manual_seed(0), vocab_size=10)
    ex = layer.experts
    assert len(mapping) == 4 and ex.b1_EH.shape == (3, 12)
    assert torch.equal(ex.b1_EH[0], b1[0]) and torch.equal(ex.b2_ED[2], b2[0])  # keep_one: expert 0 intact
    masked = (ex.w1_EDH[1] == 0).all(0)
    assert (
        masked.sum() == 6
        and (ex.b1_EH[1][masked] == 0).all()
        and torch.equal(ex.b1_EH[1][~masked], b1[0][~masked])
    )
