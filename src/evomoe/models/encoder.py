"""A bidirectional pre-norm Transformer encoder whose FFN is an MoE layer every ``moe_every`` blocks, and the
masked LM built on it (RoBERTa-style head tied to the token embedding).

Legend: B batch, S sequence, D width, V vocabulary. Padding (``valid_BS`` False) is never attended to and
never routed. Single-device, plain PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig, is_moe_block
from ..moe.layer import LayerStats, MoELayer
from ..moe.routing import GateState, RouterContext, Routing
from .attention import MultiHeadAttention


@dataclass
class SeqOutput:
    """Logits, aux losses averaged over MoE layers (unscaled), their weighted sum, stats per MoE layer."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None
    stats: list[LayerStats] = field(default_factory=list)


class RoutingSums:
    """Collects what the MoE layers of one forward return (any set of layers: one stack or two)."""

    def __init__(self, n_moe: int, device: torch.device) -> None:
        self.n = max(n_moe, 1)
        self.aux: dict[str, torch.Tensor] = {}
        self.aux_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.stats: list[LayerStats] = []

    def add(self, layer: MoELayer, routing: Routing | None, stats: LayerStats) -> None:
        self.stats.append(stats)
        if routing is None:
            return
        weights = layer.router.loss_weights()
        for name, value in routing.aux.items():
            self.aux[name] = self.aux.get(name, 0.0) + value.float() / self.n
            if weights.get(name, 0.0):
                self.aux_loss = self.aux_loss + weights[name] * value.float() / self.n


def router_context(gate: GateState, ids_BS: torch.Tensor, valid_BS: torch.Tensor | None) -> RouterContext:
    B, S = ids_BS.shape
    valid_T = None if valid_BS is None else valid_BS.reshape(-1)
    return RouterContext(gate=gate, token_ids_T=ids_BS.reshape(-1), valid_T=valid_T, shape=(B, S))


class EncoderBlock(nn.Module):
    """x + Attn(LN(x)) (bidirectional, padding masked), then x + FFN(LN(x)) with an MoE layer as FFN."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = moe.enabled and is_moe_block(layer_idx, cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.activation, moe.experts_impl, cfg.n_layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None, ctx: RouterContext):
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD), key_valid_BK=valid_BS))
        h_BSD, routing, stats = self.ffn(self.ln2(x_BSD), ctx)
        return x_BSD + self.drop(h_BSD), routing, stats


class Embeddings(nn.Module):
    """Token plus learned position embeddings (positions from ``start``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_len = cfg.seq_len
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids_BS: torch.Tensor, start: int = 0) -> torch.Tensor:
        S = ids_BS.shape[1]
        if start + S > self.max_len:
            raise ValueError(f"sequence length {start + S} exceeds model.seq_len={self.max_len}")
        pos = torch.arange(start, start + S, device=ids_BS.device)
        return self.drop(self.tok(ids_BS) + self.pos(pos))


class Encoder(nn.Module):
    """The encoder stack: embeddings given from outside (shared with a decoder), blocks, final norm."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg, moe, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(
        self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None, ctx: RouterContext, sums: RoutingSums
    ) -> torch.Tensor:
        for block in self.blocks:
            ctx.layer_idx = block.layer_idx
            x_BSD, routing, stats = block(x_BSD, valid_BS, ctx)
            if block.is_moe:
                sums.add(block.ffn, routing, stats)
        return self.ln_f(x_BSD)


def init_weights(model: nn.Module, n_layers: int) -> None:
    """N(0, 0.02) for embeddings and input projections; output projections scaled by depth (GPT-2)."""
    out_std = 0.02 / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        if name.endswith(("q.weight", "kv.weight", "tok.weight", "pos.weight", "head.dense.weight")):
            nn.init.normal_(p, std=0.02)
        elif name.endswith("proj.weight"):
            nn.init.normal_(p, std=out_std)


class MLMHead(nn.Module):
    """RoBERTa's head: dense, GELU, LayerNorm, then the (tied) token embedding and a bias."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(F.gelu(self.dense(h_BSD))), self.embedding.weight, self.bias)


class MaskedLM(nn.Module):
    """Encoder + tied MLM head. ``forward({"ids", "valid"}, gate)`` -> logits over every position."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg, self.moe_cfg = cfg, moe
        self.embed = Embeddings(cfg)
        self.encoder = Encoder(cfg, moe)
        self.head = MLMHead(cfg, self.embed.tok)
        init_weights(self, cfg.n_layers)

    def moe_layers(self) -> list[MoELayer]:
        return self.encoder.moe_layers()

    @property
    def spawned(self) -> bool:
        return any(layer.spawned for layer in self.moe_layers())

    def forward(self, inputs: dict[str, torch.Tensor], gate: GateState | None = None) -> SeqOutput:
        ids_BS, valid_BS = inputs["ids"], inputs.get("valid")
        x_BSD = self.embed(ids_BS)
        sums = RoutingSums(len(self.moe_layers()), x_BSD.device)
        h_BSD = self.encoder(x_BSD, valid_BS, router_context(gate or GateState(), ids_BS, valid_BS), sums)
        return SeqOutput(self.head(h_BSD), sums.aux, sums.aux_loss, sums.stats)
