"""Multi-head attention for the encoder and the encoder-decoder: bidirectional, causal or cross, with a
key padding mask and an optional key/value cache for incremental decoding.

Legend: B batch, Q query positions, K key positions, D width, H heads, Dh = D / H.
The cache is a plain dict {"k": [B, H, K, Dh], "v": ...}: self-attention appends the step's keys, cross
attention computes the memory's keys once. Reordering a cache for beam search is an index_select on B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(
    key_valid_BK: torch.Tensor | None, q_len: int, k_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Q, K] mask (True: may attend), or None when nothing is masked.

    Causal masks align the queries with the last ``q_len`` keys (a cached decoder step sees its past).
    """
    mask = None
    if causal:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        mask = (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if key_valid_BK is not None:
        pad = key_valid_BK[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout, self.cross = n_heads, dropout, cross
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        return x_BSD.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)

    def keys_values(self, src_BKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(src_BKD).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x_BQD: torch.Tensor,
        memory_BKD: torch.Tensor | None = None,
        key_valid_BK: torch.Tensor | None = None,
        causal: bool = False,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """Self-attention over ``x`` (``memory`` None) or cross-attention to ``memory``.

        With a ``cache``, self-attention appends this call's keys to the cached ones (and ``key_valid_BK``
        must cover all of them); cross-attention computes the memory's keys on the first call only.
        """
        B, Q, D = x_BQD.shape
        q = self._heads(self.q(x_BQD))
        if self.cross:
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.keys_values(memory_BKD)
        else:
            k, v = self.keys_values(x_BQD)
            if cache is not None and "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        mask = attention_mask(key_valid_BK, Q, k.shape[2], causal and not self.cross, x_BQD.device)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, Q, D))


def attention_reference(
    attn: MultiHeadAttention,
    x_BQD: torch.Tensor,
    memory_BKD: torch.Tensor | None = None,
    key_valid_BK: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Slow twin: every query position, every head, an explicit softmax over the keys it may see."""
    B, Q, D = x_BQD.shape
    H = attn.n_heads
    src = x_BQD if memory_BKD is None else memory_BKD
    q = attn._heads(attn.q(x_BQD))
    k, v = attn.keys_values(src)
    out = torch.zeros(B, H, Q, D // H, dtype=x_BQD.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                keys = [
                    j
                    for j in range(k.shape[2])
                    if (key_valid_BK is None or bool(key_valid_BK[b, j])) and (not causal or j <= i)
                ]
                scores = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / (D // H) ** 0.5
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h, keys]
    return attn.proj(out.transpose(1, 2).reshape(B, Q, D))
