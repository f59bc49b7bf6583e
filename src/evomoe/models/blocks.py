"""Shared building blocks: attention (causal / bidirectional / cross, padding-aware), the transformer block
whose FFN slot is an ``MoELayer``, embeddings and initialisation.

Legend: B batch, S query length, K key length, D width, H heads. Padding masks are ``valid_BS``: True for a
real token. Plain single-device PyTorch: parallelism, precision and compilation come from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig, is_moe_block
from ..moe.layer import LayerStats, MoELayer
from ..moe.router import RouterContext, Routing

ATTENTION_MODES = ("causal", "bidirectional", "cross")


def attention_mask(
    mode: str, S: int, K: int, valid_BK: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, S, K] mask (True = may attend), or None when SDPA's own causal flag suffices.

    Padded keys are hidden; a query always sees its own position (self-attention modes), so a row of
    padding never has every key hidden (which would give NaN).
    """
    if valid_BK is None:
        return None
    mask = valid_BK[:, None, None, :]  # B, 1, 1, K
    if mode == "cross":
        return mask
    causal_SK = torch.ones(S, K, dtype=torch.bool, device=device)
    if mode == "causal":
        causal_SK = causal_SK.tril()
    eye_SK = torch.eye(S, K, dtype=torch.bool, device=device)
    return (mask & causal_SK) | eye_SK


class Attention(nn.Module):
    """Multi-head attention. ``mode``: causal or bidirectional self-attention, or cross-attention to a
    memory (``kv_BKD``). No biases; the projection back into the residual is ``proj``."""

    def __init__(self, cfg: ModelConfig, mode: str = "causal") -> None:
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r}: choose from: {', '.join(ATTENTION_MODES)}")
        self.mode, self.n_heads, self.dropout = mode, cfg.n_heads, cfg.dropout
        D = cfg.d_model
        if mode == "cross":
            self.q = nn.Linear(D, D, bias=False)
            self.kv = nn.Linear(D, 2 * D, bias=False)
        else:
            self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)

    def _heads(self, t_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = t_BSD.shape
        return t_BSD.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)  # B, H, S, D/H

    def forward(
        self, x_BSD: torch.Tensor, valid_BK: torch.Tensor | None = None, kv_BKD: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, S, D = x_BSD.shape
        if self.mode == "cross":
            q = self._heads(self.q(x_BSD))
            k, v = (self._heads(t) for t in self.kv(kv_BKD).chunk(2, dim=-1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x_BSD).chunk(3, dim=-1))
        mask = attention_mask(self.mode, S, k.shape[2], valid_BK, x_BSD.device)
        p = self.dropout if self.training else 0.0
        causal = self.mode == "causal" and mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, then the FFN slot (an
    ``MoELayer``: a dense FFN until its experts are spawned; ``is_moe`` says whether it ever spawns)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int, mode: str, cross: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = moe.enabled and is_moe_block(layer_idx, cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, mode)
        if cross:
            self.ln_cross = nn.LayerNorm(cfg.d_model)
            self.cross = Attention(cfg, "cross")
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.activation, moe.experts_impl, cfg.n_layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BSD: torch.Tensor,
        ctx: RouterContext,
        valid_BS: torch.Tensor | None = None,
        memory_BKD: torch.Tensor | None = None,
        memory_valid_BK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Routing | None, LayerStats]:
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD), valid_BS))
        if memory_BKD is not None:
            x_BSD = x_BSD + self.drop(self.cross(self.ln_cross(x_BSD), memory_valid_BK, memory_BKD))
        h_BSD, routing, stats = self.ffn(self.ln2(x_BSD), ctx)
        return x_BSD + self.drop(h_BSD), routing, stats


def embed_tokens(tok_emb: nn.Embedding, pos_emb: nn.Embedding, idx_BS: torch.Tensor) -> torch.Tensor:
    """Token + learned position embeddings, checking the length against the position table."""
    S = idx_BS.shape[1]
    if S > pos_emb.num_embeddings:
        raise ValueError(f"sequence length {S} exceeds model.seq_len={pos_emb.num_embeddings}")
    return tok_emb(idx_BS) + pos_emb(torch.arange(S, device=idx_BS.device))


def init_gpt2_style(model: nn.Module, n_layers: int) -> None:
    """N(0, 0.02) for embeddings, attention input projections and heads, N(0, 0.02/sqrt(2L)) for
    projections back into the residual (experts initialise themselves the same way)."""
    out_std = 0.02 / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("qkv.weight", ".q.weight", ".kv.weight", "emb.weight", "head.weight")):
            nn.init.normal_(p, std=0.02)
        elif name.endswith("proj.weight"):
            nn.init.normal_(p, std=out_std)
