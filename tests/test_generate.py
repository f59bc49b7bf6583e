"""Generation: the key-value cache gives the logits of full re-decoding, for both styles, dense and MoE."""

from __future__ import annotations

import pytest
import torch

from evomoe.config import Config, ModelConfig, MoEConfig
from evomoe.evolve import spawn_model
from evomoe.generate import generate, sample_next
from evomoe.models import GPT
from evomoe.models.layers import KVCache


def tiny(style: str, moe: bool) -> GPT:
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, seq_len=40, style=style)
    if style == "llama":
        mcfg.activation, mcfg.n_kv_heads, mcfg.qkv_bias = "swiglu", 2, True
    model = GPT(mcfg, MoEConfig(num_experts=4))
    if moe:
        cfg = Config()
        cfg.model, cfg.moe.num_experts, cfg.evolve.noise, cfg.router.gate_init = mcfg, 4, 0.5, "normal"
        spawn_model(model, cfg, torch.Generator().manual_seed(0), vocab_size=50)
    return model.eval()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("moe", [False, True])
def test_cached_decoding_equals_full_redecoding(style, moe):
    model = tiny(style, moe)
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache.empty(2)
        parts = [model(idx[:, :7], cache=cache).logits, model(idx[:, 7:12], cache=cache).logits]
        parts += [model(idx[:, i : i + 1], cache=cache).logits for i in range(12, 20)]
    assert cache.length == 20
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    fast = generate(model, idx[:, :5], 12, temperature=0.0)
    slow = generate(model, idx[:, :5], 12, temperature=0.0, cache=False)
    assert torch.equal(fast, slow)
    sampled = [
        generate(model, idx[:, :5], 8, temperature=1.0, top_k=5, seed=3, cache=c) for c in (True, False)
    ]
    assert torch.equal(*sampled)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, 0.0).item() == 1
    draws = {
        sample_next(logits, 5.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
        for s in range(50)
    }
    assert draws == {1, 3}  # only the two best, and both of them at a high temperature
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


def test_too_long_is_an_error():
    with pytest.raises(ValueError, match="exceeds model.seq_len = 40"):
        generate(tiny("llama", False), torch.zeros(1, 30, dtype=torch.long), 20)
