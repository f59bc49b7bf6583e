"""A pre-norm GPT whose feed-forward is an MoE layer every ``moe_every`` blocks.

Legend: B batch, S sequence, D width, V vocabulary, H heads. Single-device, plain PyTorch: parallelism,
precision and compilation are applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig, is_moe_block
from ..moe.layer import LayerStats, MoELayer
from ..moe.routing import GateState, RouterContext


@dataclass
class GPTOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None  # language-model cross-entropy (nats/token)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unscaled, averaged over MoE layers
    aux_loss: torch.Tensor | None = None  # sum of aux * router coefficients
    stats: list[LayerStats] = field(default_factory=list)  # one per MoE block


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B, H, S, D/H
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = moe.enabled and is_moe_block(layer_idx, cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        impl = moe.experts_impl
        self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.activation, impl, cfg.n_layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, ctx: RouterContext):
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD)))
        h_BSD, routing, stats = self.ffn(self.ln2(x_BSD), ctx)
        return x_BSD + self.drop(h_BSD), routing, stats


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg, self.moe_cfg = cfg, moe
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, moe, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("qkv.weight") or name.endswith("emb.weight") or name == "lm_head.weight":
                nn.init.normal_(p, std=0.02)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=out_std)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    @property
    def spawned(self) -> bool:
        return any(layer.spawned for layer in self.moe_layers())

    def forward(
        self,
        idx_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        gate: GateState | None = None,
        valid_BS: torch.Tensor | None = None,
    ) -> GPTOutput:
        B, S = idx_BS.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"sequence length {S} exceeds model.seq_len={self.cfg.seq_len}")
        pos = torch.arange(S, device=idx_BS.device)
        x_BSD = self.tok_emb(idx_BS) + self.pos_emb(pos)
        ctx = RouterContext(
            gate=gate or GateState(),
            token_ids_T=idx_BS.reshape(-1),
            valid_T=None if valid_BS is None else valid_BS.reshape(-1),
            shape=(B, S),
        )
        aux_sum: dict[str, torch.Tensor] = {}
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        stats: list[LayerStats] = []
        n_moe = max(len(self.moe_layers()), 1)
        for block in self.blocks:
            ctx.layer_idx = block.layer_idx
            x_BSD, routing, layer_stats = block(x_BSD, ctx)
            if not block.is_moe:
                continue
            stats.append(layer_stats)
            if routing is None:
                continue
            weights = block.ffn.router.loss_weights()
            for name, value in routing.aux.items():
                aux_sum[name] = aux_sum.get(name, 0.0) + value.float() / n_moe
                if weights.get(name, 0.0):
                    aux_loss = aux_loss + weights[name] * value.float() / n_moe
        logits = self.lm_head(self.ln_f(x_BSD))
        loss = None
        if targets_BS is not None:
            flat_targets = targets_BS.reshape(-1)
            if valid_BS is not None:
                flat_targets = flat_targets.masked_fill(~valid_BS.reshape(-1), -100)
            loss = F.cross_entropy(logits.float().view(B * S, -1), flat_targets, ignore_index=-100)
        return GPTOutput(logits, loss, aux_sum, aux_loss, stats)
