"""The shared attention (bidirectional / causal / cross, padding masked, with a key/value cache) against an
explicit per-query softmax over the keys each query may see."""

from __future__ import annotations

import pytest
import torch

from evomoe.config import ModelConfig
from evomoe.models.blocks import Attention
from evomoe.models.layers import KVCache


def attention_reference(attn: Attention, x_BQD, memory_BKD=None, valid_BK=None) -> torch.Tensor:
    """Slow twin: every sentence, head and query; padded keys hidden except a query's own position."""
    B, Q, D = x_BQD.shape
    H = attn.n_heads
    q, k, v = attn._project(x_BQD, memory_BKD)
    q, k, v = (attn._heads(t, H) for t in (q, k, v))
    out = torch.zeros(B, H, Q, D // H)
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                keys = []
                for j in range(k.shape[2]):
                    visible = valid_BK is None or bool(valid_BK[b, j]) or (attn.mode != "cross" and i == j)
                    if visible and (attn.mode != "causal" or j <= i):
                        keys.append(j)
                scores = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / (D // H) ** 0.5
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h, keys]
    return attn.proj(out.transpose(1, 2).reshape(B, Q, D))


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "cross"])
def test_attention_equals_reference(mode):
    torch.manual_seed(0)
    attn = Attention(ModelConfig(d_model=16, n_heads=4), mode).eval()
    x = torch.randn(3, 5, 16)
    memory = torch.randn(3, 7, 16) if mode == "cross" else None
    k_len = 7 if mode == "cross" else 5
    valid = torch.arange(k_len)[None, :] < torch.tensor([k_len, 3, 1])[:, None]
    fast = attn(x, valid, memory)
    slow = attention_reference(attn, x, memory, valid)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_cached_steps_equal_full_causal_pass():
    torch.manual_seed(1)
    attn = Attention(ModelConfig(d_model=16, n_heads=2), "causal").eval()
    x = torch.randn(2, 6, 16)
    full = attn(x)
    cache = KVCache.empty(1)
    steps = []
    for t in range(6):
        steps.append(attn(x[:, t : t + 1], cache=cache))
        cache.length += 1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.keys[0].shape == (2, 2, 6, 8)
