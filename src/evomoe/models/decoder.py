"""The decoder-only language model (GPT, pre-norm), its FFN an MoE layer every ``moe_every`` blocks.

Legend: B batch, S sequence, D width, V vocabulary. Parameter names are those of the first release
(``tok_emb``, ``blocks.N.attn.qkv``, ``lm_head``), so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig, MoEConfig
from ..moe.layer import MoELayer
from ..moe.router import GateState, RouterContext
from ..registry import MODELS
from .base import ModelOutput, MoEModel, RoutingCollector
from .blocks import Block, embed_tokens, init_gpt2_style
from .layers import KVCache, make_norm


@MODELS.register("decoder")
class Decoder(MoEModel):
    kind = "decoder"

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__(cfg, moe)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # llama style: rotary positions inside attention, no table
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.style == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, moe, i, "causal") for i in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        init_gpt2_style(self, cfg.n_layers)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(
        self,
        tokens_BS: torch.Tensor,
        valid_BS: torch.Tensor | None = None,
        gate: GateState | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """``valid_BS``: False for padding (never attended to, never routed). ``cache``: decode
        ``tokens_BS`` after the positions it holds, and append theirs (incremental generation)."""
        B, S = tokens_BS.shape
        offset = cache.length if cache is not None else 0
        x_BSD = embed_tokens(self.tok_emb, self.pos_emb, tokens_BS, self.cfg.seq_len, offset)
        ctx = RouterContext(
            gate=gate or GateState(),
            token_ids_T=tokens_BS.reshape(-1),
            valid_T=None if valid_BS is None else valid_BS.reshape(-1),
            shape=(B, S),
        )
        collect = RoutingCollector(len(self.moe_layers()), x_BSD)
        for block in self.blocks:
            x_BSD, routing, stats = block(x_BSD, ctx, valid_BS, cache=cache)
            collect.add(block.ffn, block.is_moe, routing, stats)
        if cache is not None:
            cache.length += S
        return collect.output(self.lm_head(self.ln_f(x_BSD)))


GPT = Decoder  # the first release's name
