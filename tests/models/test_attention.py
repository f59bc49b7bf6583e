"""Attention (bidirectional / causal / cross, padding masked, cached) against the explicit-softmax loop."""

from __future__ import annotations

import pytest
import torch

from evomoe.models.attention import MultiHeadAttention, attention_reference


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "cross"])
def test_attention_equals_reference(mode):
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, cross=mode == "cross").eval()
    x = torch.randn(3, 5, 16)
    memory = torch.randn(3, 7, 16) if mode == "cross" else None
    k_len = 7 if mode == "cross" else 5
    valid = torch.arange(k_len)[None, :] < torch.tensor([k_len, 3, 1])[:, None]
    causal = mode == "causal"
    fast = attn(x, memory, key_valid_BK=valid, causal=causal)
    slow = attention_reference(attn, x, memory, key_valid_BK=valid, causal=causal)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_cached_steps_equal_full_causal_pass():
    torch.manual_seed(1)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 6, 16)
    full = attn(x, causal=True)
    cache: dict = {}
    steps = [attn(x[:, t : t + 1], causal=True, cache=cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
