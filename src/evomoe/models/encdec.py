"""A Transformer encoder-decoder for translation with MoE FFNs in both stacks.

Each stack has its own MoE layers (``moe_layers()``: encoder first, then decoder), so its own routers,
aux losses and statistics; one gate state (the DTS schedule) drives both. One token embedding serves the
source, the target and the output projection (one BPE over both languages). Decoding runs one position
at a time with a key/value cache (``start_decoding`` / ``decode_step`` / ``reorder_state``); its slow
twin is ``forward`` over the whole prefix (the tests compare them).

Legend: B batch, S source length, T target length, D width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig
from ..moe.layer import MoELayer
from ..moe.router import GateState
from ..registry import MODELS
from .base import ModelOutput, MoEModel, RoutingCollector
from .blocks import Block, init_gpt2_style
from .encoder import EncoderStack, router_context


@MODELS.register("encdec")
class EncoderDecoder(MoEModel):
    kind = "encdec"

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg, self.moe_cfg = cfg, moe
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)  # shared by both stacks
        self.encoder = EncoderStack(cfg, moe)
        self.dec_blocks = nn.ModuleList(Block(cfg, moe, i, "causal", cross=True) for i in range(cfg.n_layers))
        self.dec_ln = nn.LayerNorm(cfg.d_model)
        init_gpt2_style(self, cfg.n_layers)

    def decoder_moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.dec_blocks if b.is_moe]

    def moe_layers(self) -> list[MoELayer]:
        return self.encoder.moe_layers() + self.decoder_moe_layers()

    def embed(self, ids_BS: torch.Tensor, start: int = 0) -> torch.Tensor:
        S = ids_BS.shape[1]
        if start + S > self.cfg.seq_len:
            raise ValueError(f"sequence length {start + S} exceeds model.seq_len={self.cfg.seq_len}")
        return self.tok_emb(ids_BS) + self.pos_emb(torch.arange(start, start + S, device=ids_BS.device))

    def encode(self, src_BS, src_valid_BS, gate, collect: RoutingCollector) -> torch.Tensor:
        ctx = router_context(gate, src_BS, src_valid_BS)
        return self.encoder(self.embed(src_BS), src_valid_BS, ctx, collect)

    def decode(self, tgt_BT, tgt_valid_BT, memory_BSD, src_valid_BS, gate, collect, caches=None, start=0):
        """Next-token logits [B, T, V]; ``caches`` (one dict per block) for incremental decoding."""
        x_BTD = self.embed(tgt_BT, start)
        ctx = router_context(gate, tgt_BT, tgt_valid_BT)
        for i, block in enumerate(self.dec_blocks):
            ctx.layer_idx = block.layer_idx
            cache = None if caches is None else caches[i]
            x_BTD, routing, stats = block(x_BTD, ctx, tgt_valid_BT, memory_BSD, src_valid_BS, cache=cache)
            collect.add(block.ffn, block.is_moe, routing, stats)
        return F.linear(self.dec_ln(x_BTD), self.tok_emb.weight)

    def forward(
        self,
        src_BS: torch.Tensor,
        tgt_BT: torch.Tensor,
        src_valid_BS: torch.Tensor | None = None,
        tgt_valid_BT: torch.Tensor | None = None,
        gate: GateState | None = None,
    ) -> ModelOutput:
        """Teacher forcing: ``tgt_BT`` is ``<s> y_1 .. y_n`` (padded), the logits predict ``y_1 .. </s>``."""
        collect = RoutingCollector(len(self.moe_layers()), src_BS)
        memory = self.encode(src_BS, src_valid_BS, gate, collect)
        return collect.output(self.decode(tgt_BT, tgt_valid_BT, memory, src_valid_BS, gate, collect))

    # ------------------------------------------------------------------------------------- decoding
    def start_decoding(self, src_BS, src_valid_BS, gate: GateState | None, repeat: int = 1) -> dict:
        """Encode once; the state for ``decode_step`` (each sentence repeated ``repeat`` times: beams)."""
        memory = self.encode(src_BS, src_valid_BS, gate, RoutingCollector(1, src_BS))
        if repeat > 1:
            memory = memory.repeat_interleave(repeat, 0)
            src_valid_BS = None if src_valid_BS is None else src_valid_BS.repeat_interleave(repeat, 0)
        caches = [{} for _ in self.dec_blocks]
        return {"memory": memory, "src_valid": src_valid_BS, "caches": caches, "pos": 0, "gate": gate}

    def decode_step(self, tokens_B: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Log-probabilities [B, V] of the next token after ``tokens_B``; the caches grow by one position."""
        tokens = tokens_B.to(state["memory"].device)[:, None]
        logits = self.decode(
            tokens, None, state["memory"], state["src_valid"], state["gate"], RoutingCollector(1, tokens),
            caches=state["caches"], start=state["pos"],
        )  # fmt: skip
        state["pos"] += 1
        return torch.log_softmax(logits[:, -1].float(), -1), state

    @staticmethod
    def reorder_state(state: dict, index_B: torch.Tensor) -> dict:
        """Keep rows ``index_B`` of every cached tensor (beam search)."""
        index_B = index_B.to(state["memory"].device)
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
