"""A Transformer encoder-decoder for translation with MoE FFNs in both stacks.

Each stack has its own MoE layers (``moe_layers()``: encoder first, then decoder), so its own routers,
aux losses and stats; one gate state (the DTS schedule) drives both. The token embedding is shared by
source, target and the output projection (one BPE over both languages). Decoding runs step by step with
a key/value cache (``start_decoding`` / ``decode_step`` / ``reorder_state``); its slow twin is re-running
``forward`` on the whole prefix.

Legend: B batch, S source length, T target length, D width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig, is_moe_block
from ..moe.layer import MoELayer
from ..moe.routing import GateState, RouterContext
from .attention import MultiHeadAttention
from .encoder import Embeddings, Encoder, RoutingSums, SeqOutput, init_weights, router_context


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, then the (MoE) FFN; all pre-norm."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = moe.enabled and is_moe_block(layer_idx, cfg)
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cross=True)
        self.ffn = MoELayer(cfg.d_model, cfg.d_ff, cfg.activation, moe.experts_impl, cfg.n_layers)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, memory_BSD, src_valid_BS, ctx: RouterContext, cache: dict | None = None):
        self_cache = None if cache is None else cache.setdefault("self", {})
        cross_cache = None if cache is None else cache.setdefault("cross", {})
        x_BTD = x_BTD + self.drop(self.self_attn(self.ln1(x_BTD), causal=True, cache=self_cache))
        h = self.cross_attn(self.ln2(x_BTD), memory_BSD, key_valid_BK=src_valid_BS, cache=cross_cache)
        x_BTD = x_BTD + self.drop(h)
        h_BTD, routing, stats = self.ffn(self.ln3(x_BTD), ctx)
        return x_BTD + self.drop(h_BTD), routing, stats


class EncoderDecoder(nn.Module):
    """``forward({"src", "src_valid", "tgt_in", "tgt_valid"}, gate)`` -> next-token logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg, self.moe_cfg = cfg, moe
        self.embed = Embeddings(cfg)
        self.encoder = Encoder(cfg, moe)
        self.dec_blocks = nn.ModuleList(DecoderBlock(cfg, moe, i) for i in range(cfg.n_layers))
        self.dec_ln = nn.LayerNorm(cfg.d_model)
        init_weights(self, cfg.n_layers)

    def decoder_moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.dec_blocks if b.is_moe]

    def moe_layers(self) -> list[MoELayer]:
        return self.encoder.moe_layers() + self.decoder_moe_layers()

    @property
    def spawned(self) -> bool:
        return any(layer.spawned for layer in self.moe_layers())

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dec_ln(h_BTD), self.embed.tok.weight)

    def encode(self, src_BS, src_valid_BS, gate: GateState, sums: RoutingSums) -> torch.Tensor:
        ctx = router_context(gate, src_BS, src_valid_BS)
        return self.encoder(self.embed(src_BS), src_valid_BS, ctx, sums)

    def decode(self, tgt_BT, tgt_valid_BT, memory_BSD, src_valid_BS, gate, sums, caches=None, start=0):
        x_BTD = self.embed(tgt_BT, start)
        ctx = router_context(gate, tgt_BT, tgt_valid_BT)
        for i, block in enumerate(self.dec_blocks):
            ctx.layer_idx = block.layer_idx
            cache = None if caches is None else caches[i]
            x_BTD, routing, stats = block(x_BTD, memory_BSD, src_valid_BS, ctx, cache)
            if block.is_moe:
                sums.add(block.ffn, routing, stats)
        return self.logits(x_BTD)

    def forward(self, inputs: dict[str, torch.Tensor], gate: GateState | None = None) -> SeqOutput:
        gate = gate or GateState()
        src, src_valid = inputs["src"], inputs.get("src_valid")
        sums = RoutingSums(len(self.moe_layers()), src.device)
        memory = self.encode(src, src_valid, gate, sums)
        logits = self.decode(inputs["tgt_in"], inputs.get("tgt_valid"), memory, src_valid, gate, sums)
        return SeqOutput(logits, sums.aux, sums.aux_loss, sums.stats)

    # ------------------------------------------------------------------------------------- decoding
    def start_decoding(self, src_BS, src_valid_BS, gate: GateState, repeat: int = 1) -> dict:
        """Encode once; the state for ``decode_step`` (each sentence repeated ``repeat`` times: beams)."""
        sums = RoutingSums(len(self.moe_layers()), src_BS.device)
        memory = self.encode(src_BS, src_valid_BS, gate, sums)
        if repeat > 1:
            memory = memory.repeat_interleave(repeat, 0)
            src_valid_BS = None if src_valid_BS is None else src_valid_BS.repeat_interleave(repeat, 0)
        caches = [{} for _ in self.dec_blocks]
        return {"memory": memory, "src_valid": src_valid_BS, "caches": caches, "pos": 0, "gate": gate}

    def decode_step(self, tokens_B: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Log-probabilities [B, V] of the next token after ``tokens_B``; the caches grow by one position."""
        sums = RoutingSums(len(self.moe_layers()), tokens_B.device)
        logits = self.decode(
            tokens_B[:, None], None, state["memory"], state["src_valid"], state["gate"], sums,
            caches=state["caches"], start=state["pos"],
        )  # fmt: skip
        state["pos"] += 1
        return torch.log_softmax(logits[:, -1].float(), -1), state

    @staticmethod
    def reorder_state(state: dict, index_B: torch.Tensor) -> dict:
        """Keep rows ``index_B`` of every cached tensor (beam search)."""
        pick = lambda t: None if t is None else t.index_select(0, index_B)  # noqa: E731
        caches = [
            {k: {n: pick(t) for n, t in c.items()} for k, c in cache.items()} for cache in state["caches"]
        ]
        return {
            **state,
            "memory": pick(state["memory"]),
            "src_valid": pick(state["src_valid"]),
            "caches": caches,
        }
