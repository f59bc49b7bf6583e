"""A bidirectional pre-norm Transformer encoder, its FFN an MoE layer every ``moe_every`` blocks, and the
masked LM built on it (RoBERTa-style head tied to the token embedding).

Legend: B batch, S sequence, D width, V vocabulary. Padding (``valid_BS`` False) is never attended to and
never routed. Single-device, plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig
from ..moe.layer import MoELayer
from ..moe.router import GateState, RouterContext
from ..registry import MODELS
from .base import ModelOutput, MoEModel, RoutingCollector
from .blocks import Block, embed_tokens, init_gpt2_style


def router_context(
    gate: GateState | None, ids_BS: torch.Tensor, valid_BS: torch.Tensor | None
) -> RouterContext:
    """What the routers see of one stack's input: the token ids and the padding mask, flattened."""
    B, S = ids_BS.shape
    valid_T = None if valid_BS is None else valid_BS.reshape(-1)
    return RouterContext(
        gate=gate or GateState(), token_ids_T=ids_BS.reshape(-1), valid_T=valid_T, shape=(B, S)
    )


class EncoderStack(nn.Module):
    """Bidirectional blocks and a final norm; the embeddings come from outside (a decoder may share them)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, moe, i, "bidirectional") for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(
        self,
        x_BSD: torch.Tensor,
        valid_BS: torch.Tensor | None,
        ctx: RouterContext,
        collect: RoutingCollector,
    ) -> torch.Tensor:
        for block in self.blocks:
            ctx.layer_idx = block.layer_idx
            x_BSD, routing, stats = block(x_BSD, ctx, valid_BS)
            collect.add(block.ffn, block.is_moe, routing, stats)
        return self.ln_f(x_BSD)


class MLMHead(nn.Module):
    """RoBERTa's head: dense, GELU, LayerNorm, then the tied token embedding and a bias."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(F.gelu(self.dense(h_BSD))), self.embedding.weight, self.bias)


@MODELS.register("encoder")
class MaskedLM(MoEModel):
    """Encoder + tied MLM head: logits [B, S, V] at every position (the task picks the masked ones)."""

    kind = "encoder"

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__(cfg, moe)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.encoder = EncoderStack(cfg, moe)
        self.head = MLMHead(cfg, self.tok_emb)
        init_gpt2_style(self, cfg.n_layers)

    def moe_layers(self) -> list[MoELayer]:
        return self.encoder.moe_layers()

    def forward(
        self, tokens_BS: torch.Tensor, valid_BS: torch.Tensor | None = None, gate: GateState | None = None
    ) -> ModelOutput:
        x_BSD = embed_tokens(self.tok_emb, self.pos_emb, tokens_BS, self.cfg.seq_len)
        collect = RoutingCollector(len(self.moe_layers()), x_BSD)
        h_BSD = self.encoder(x_BSD, valid_BS, router_context(gate, tokens_BS, valid_BS), collect)
        return collect.output(self.head(h_BSD))
