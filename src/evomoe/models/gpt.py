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
from .layers import Attention, KVCache, make_norm


@dataclass
class GPTOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None  # language-model cross-entropy (nats/token)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unscaled, averaged over MoE layers
    aux_loss: torch.Tensor | None = None  # sum of aux * router coefficients
    stats: list[LayerStats] = field(default_factory=list)  # one per MoE block


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = moe.enabled and is_moe_block(layer_idx, cfg)
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.ln2 = make_norm(cfg)
        impl = moe.experts_impl
        self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.activation, impl, cfg.n_layers, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, ctx: RouterContext, cache: KVCache | None = None):
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD), cache))
        h_BSD, routing, stats = self.ffn(self.ln2(x_BSD), ctx)
        return x_BSD + self.drop(h_BSD), routing, stats


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg, self.moe_cfg = cfg, moe
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # llama style: rotary positions inside attention, no table
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.style == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, moe, i) for i in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
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
        cache: KVCache | None = None,
    ) -> GPTOutput:
        """``cache``: decode ``idx_BS`` after the positions it holds (and append theirs to it)."""
        B, S = idx_BS.shape
        offset = cache.length if cache is not None else 0
        if offset + S > self.cfg.seq_len:
            raise ValueError(f"sequence length {offset + S} exceeds model.seq_len={self.cfg.seq_len}")
        x_BSD = self.tok_emb(idx_BS)
        if self.pos_emb is not None:
            x_BSD = x_BSD + self.pos_emb(torch.arange(offset, offset + S, device=idx_BS.device))
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
            x_BSD, routing, layer_stats = block(x_BSD, ctx, cache)
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
        if cache is not None:
            cache.length += S
        logits = self.lm_head(self.ln_f(x_BSD))
        loss = None
        if targets_BS is not None:
            flat_targets = targets_BS.reshape(-1)
            if valid_BS is not None:
                flat_targets = flat_targets.masked_fill(~valid_BS.reshape(-1), -100)
            loss = F.cross_entropy(logits.float().view(B * S, -1), flat_targets, ignore_index=-100)
        return GPTOutput(logits, loss, aux_sum, aux_loss, stats)
