"""Shared building blocks: attention (causal / bidirectional / cross, padding-aware), the transformer block
whose FFN slot is an ``MoELayer``, embeddings and initialisation.

Legend: B batch, S query length, K key length, D width, H heads, Hkv key/value heads, Dh head width.
Padding masks are ``valid_BS``: True for a real token. Plain single-device PyTorch: parallelism, precision
and compilation come from outside. Style options (``model.style``, biases, grouped-query heads) and the
key-value cache of incremental decoding are described in ``layers.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig, is_moe_block
from ..moe.layer import LayerStats, MoELayer
from ..moe.router import RouterContext, Routing
from .layers import KVCache, apply_rotary, attend_cached, make_norm, rotary_cos_sin

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


def math_attention_pays(q: torch.Tensor) -> bool:
    """On CPU under bf16/fp16 autocast the fused SDPA kernel's backward is ~4x slower than fp32's
    (docs/performance.md): there, attention is spelled out (bf16 matmuls, softmax in fp32)."""
    return q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and q.dtype != torch.float32


def math_attention(q, k, v, mask: torch.Tensor | None, causal: bool, dropout_p: float = 0.0):
    """``scaled_dot_product_attention`` as matmuls: softmax(q k^T / sqrt(Dh) + mask) v, the softmax in fp32.
    ``mask``: boolean, True = may attend (broadcast to [B, H, S, K]); ``causal``: the lower triangle."""
    S, K = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        mask = torch.ones(S, K, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head attention. ``mode``: causal or bidirectional self-attention, or cross-attention to a
    memory (``kv_BKD``). Options from the model config: grouped-query heads (``n_kv_heads``), rotary
    positions (``style = "llama"``, self-attention), biases (``qkv_bias``, ``out_bias``)."""

    def __init__(self, cfg: ModelConfig, mode: str = "causal", layer_idx: int = 0) -> None:
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r}: choose from: {', '.join(ATTENTION_MODES)}")
        self.mode, self.n_heads, self.dropout = mode, cfg.n_heads, cfg.dropout
        self.n_kv, self.head_dim, self.layer_idx = (
            cfg.n_kv_heads or cfg.n_heads,
            cfg.d_model // cfg.n_heads,
            layer_idx,
        )
        self.rotary, self.theta = cfg.style == "llama" and mode != "cross", cfg.rope_theta
        D, kv_width = cfg.d_model, (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
        if mode == "cross":
            self.q = nn.Linear(D, D, bias=cfg.qkv_bias)
            self.kv = nn.Linear(D, 2 * kv_width, bias=cfg.qkv_bias)
        else:  # rows: [q; k; v], heads major (the layout of HF's q/k/v projections, concatenated)
            self.qkv = nn.Linear(D, D + 2 * kv_width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(D, D, bias=cfg.out_bias)

    def _heads(self, t_BSX: torch.Tensor, n: int) -> torch.Tensor:
        B, S, _ = t_BSX.shape
        return t_BSX.view(B, S, n, self.head_dim).transpose(1, 2)  # B, n, S, Dh

    def _project(self, x_BSD: torch.Tensor, kv_BKD: torch.Tensor | None):
        if self.mode == "cross":
            k, v = self.kv(kv_BKD).chunk(2, dim=-1)
            return self.q(x_BSD), k, v
        kv_width = self.n_kv * self.head_dim
        return self.qkv(x_BSD).split([x_BSD.shape[-1], kv_width, kv_width], dim=-1)

    def memory_kv(self, kv_BKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of a memory, [B, Hkv, K, Dh] each: what ``forward`` computes
        from ``kv_BKD``, computed once so that incremental decoding need not redo it at every step."""
        k, v = self.kv(kv_BKD).chunk(2, dim=-1)
        return self._heads(k, self.n_kv), self._heads(v, self.n_kv)

    def forward(
        self,
        x_BSD: torch.Tensor,
        valid_BK: torch.Tensor | None = None,
        kv_BKD: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``cache`` (causal mode, no padding): attend over the cached positions too, and append these.
        ``memory_kv`` (cross mode): the memory's keys and values from ``memory_kv``, instead of ``kv_BKD``."""
        B, S, D = x_BSD.shape
        if memory_kv is not None:
            if self.mode != "cross":
                raise ValueError("memory_kv is for cross-attention")
            q, (k, v) = self._heads(self.q(x_BSD), self.n_heads), memory_kv
        else:
            q, k, v = self._project(x_BSD, kv_BKD)
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv), self._heads(v, self.n_kv)
        offset = cache.length if cache is not None else 0
        if self.rotary:
            cos, sin = rotary_cos_sin(
                torch.arange(offset, offset + S, device=x_BSD.device), self.head_dim, self.theta
            )
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(self.layer_idx, k, v)
        if self.n_kv != self.n_heads:  # each key/value head serves n_heads / n_kv consecutive query heads
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))
        p = self.dropout if self.training else 0.0
        if offset:
            if valid_BK is not None:
                raise ValueError("cached decoding takes no padding mask")
            y = attend_cached(q, k, v, offset, p)
        else:
            mask = attention_mask(self.mode, S, k.shape[2], valid_BK, x_BSD.device)
            causal = self.mode == "causal" and mask is None
            if math_attention_pays(q):
                y = math_attention(q, k, v, mask, causal, p)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, then the FFN slot (an
    ``MoELayer``: a dense FFN until its experts are spawned; ``is_moe`` says whether it ever spawns)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int, mode: str, cross: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = moe.enabled and is_moe_block(layer_idx, cfg)
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, mode, layer_idx)
        if cross:
            self.ln_cross = make_norm(cfg)
            self.cross = Attention(cfg, "cross", layer_idx)
        self.ln2 = make_norm(cfg)
        impl = moe.experts_impl
        self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.activation, impl, cfg.n_layers, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BSD: torch.Tensor,
        ctx: RouterContext,
        valid_BS: torch.Tensor | None = None,
        memory_BKD: torch.Tensor | None = None,
        memory_valid_BK: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Routing | None, LayerStats]:
        """``memory_kv``: this block's cross-attention keys/values of the memory (``Attention.memory_kv``),
        used in place of ``memory_BKD``."""
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD), valid_BS, cache=cache))
        if memory_BKD is not None or memory_kv is not None:
            y = self.cross(self.ln_cross(x_BSD), memory_valid_BK, memory_BKD, memory_kv=memory_kv)
            x_BSD = x_BSD + self.drop(y)
        h_BSD, routing, stats = self.ffn(self.ln2(x_BSD), ctx)
        return x_BSD + self.drop(h_BSD), routing, stats


def embed_tokens(
    tok_emb: nn.Embedding, pos_emb: nn.Embedding | None, idx_BS: torch.Tensor, seq_len: int, offset: int = 0
) -> torch.Tensor:
    """Token (+ learned position) embeddings of positions offset.., checking them against ``seq_len``
    (``pos_emb`` None: rotary positions, applied inside attention)."""
    end = offset + idx_BS.shape[1]
    if end > seq_len:
        raise ValueError(f"sequence length {end} exceeds model.seq_len={seq_len}")
    x_BSD = tok_emb(idx_BS)
    if pos_emb is None:
        return x_BSD
    return x_BSD + pos_emb(torch.arange(offset, end, device=idx_BS.device))


def init_gpt2_style(model: nn.Module, n_layers: int) -> None:
    """N(0, 0.02) for embeddings, attention input projections and heads, N(0, 0.02/sqrt(2L)) for
    projections back into the residual (experts initialise themselves the same way)."""
    out_std = 0.02 / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("qkv.weight", ".q.weight", ".kv.weight", "emb.weight", "head.weight")):
            nn.init.normal_(p, std=0.02)
        elif name.endswith("proj.weight"):
            nn.init.normal_(p, std=out_std)
        elif name.endswith(("qkv.bias", "proj.bias", ".q.bias", ".kv.bias")):
            nn.init.zeros_(p)
