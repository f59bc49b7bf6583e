"""A Transformer encoder-decoder for translation with MoE FFNs in both stacks.

Each stack has its own MoE layers (``moe_layers()``: encoder first, then decoder), so its own routers,
aux losses and statistics; one gate state (the DTS schedule) drives both. One token embedding serves the
source, the target and the output projection (one BPE over both languages). Decoding runs one position
at a time with a key/value cache (``start_decoding`` / ``decode_step`` / ``reorder_state``): the decoder's
self-attention keys/values grow by one position per step, and the cross-attention keys/values of the
encoder memory are computed once per sentence (``cache_memory=False`` recomputes them at every step: the
reference the tests compare with). The slow twin of both is ``forward`` over the whole prefix.

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
from .blocks import Block, embed_tokens, init_gpt2_style
from .encoder import EncoderStack, router_context
from .layers import KVCache


@MODELS.register("encdec")
class EncoderDecoder(MoEModel):
    kind = "encdec"

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__(cfg, moe)
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
        return embed_tokens(self.tok_emb, self.pos_emb, ids_BS, self.cfg.seq_len, start)

    def encode(self, src_BS, src_valid_BS, gate, collect: RoutingCollector) -> torch.Tensor:
        ctx = router_context(gate, src_BS, src_valid_BS)
        return self.encoder(self.embed(src_BS), src_valid_BS, ctx, collect)

    def decode(
        self, tgt_BT, tgt_valid_BT, memory_BSD, src_valid_BS, gate, collect, cache=None, memory_kv=None
    ):
        """Next-token logits [B, T, V]; ``cache`` (the decoder's self-attention keys/values) for
        incremental decoding; ``memory_kv`` (one (keys, values) per decoder block, ``memory_kv()``): the
        memory's cross-attention keys/values, used instead of projecting ``memory_BSD`` again."""
        start = cache.length if cache is not None else 0
        x_BTD = self.embed(tgt_BT, start)
        ctx = router_context(gate, tgt_BT, tgt_valid_BT)
        for i, block in enumerate(self.dec_blocks):
            ctx.layer_idx = block.layer_idx
            kv = None if memory_kv is None else memory_kv[i]
            x_BTD, routing, stats = block(
                x_BTD, ctx, tgt_valid_BT, memory_BSD if kv is None else None, src_valid_BS, cache, kv
            )
            collect.add(block.ffn, block.is_moe, routing, stats)
        if cache is not None:
            cache.length += tgt_BT.shape[1]
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
    def memory_kv(self, memory_BSD: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder block's cross-attention keys/values of ``memory_BSD``."""
        return [block.cross.memory_kv(memory_BSD) for block in self.dec_blocks]

    def start_decoding(
        self, src_BS, src_valid_BS, gate: GateState | None, repeat: int = 1, cache_memory: bool = True
    ) -> dict:
        """Encode once; the state for ``decode_step`` (each sentence repeated ``repeat`` times: beams).
        ``cache_memory``: compute the memory's cross-attention keys/values here, once per sentence (before
        the repeat), instead of at every step (False: the slow reference)."""
        memory = self.encode(src_BS, src_valid_BS, gate, RoutingCollector(1, src_BS))
        rep = (lambda t: t.repeat_interleave(repeat, 0)) if repeat > 1 else (lambda t: t)  # noqa: E731
        src_valid_BS = None if src_valid_BS is None else rep(src_valid_BS)
        state = {"src_valid": src_valid_BS, "cache": KVCache.empty(len(self.dec_blocks)), "gate": gate,
                 "device": memory.device, "memory": None, "memory_kv": None}  # fmt: skip
        if cache_memory:
            state["memory_kv"] = [(rep(k), rep(v)) for k, v in self.memory_kv(memory)]
        else:
            state["memory"] = rep(memory)
        return state

    def decode_step(self, tokens_B: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Log-probabilities [B, V] of the next token after ``tokens_B``; the cache grows by one position."""
        tokens = tokens_B.to(state["device"])[:, None]
        logits = self.decode(
            tokens, None, state["memory"], state["src_valid"], state["gate"], RoutingCollector(1, tokens),
            cache=state["cache"], memory_kv=state["memory_kv"],
        )  # fmt: skip
        return torch.log_softmax(logits[:, -1].float(), -1), state

    @staticmethod
    def reorder_state(state: dict, index_B: torch.Tensor) -> dict:
        """Keep rows ``index_B`` of every cached tensor (beam search)."""
        index_B = index_B.to(state["device"])
        pick = lambda t: None if t is None else t.index_select(0, index_B)  # noqa: E731
        c = state["cache"]
        cache = KVCache([pick(k) for k in c.keys], [pick(v) for v in c.values], c.length)
        kv = state["memory_kv"]
        return {
            **state,
            "memory": pick(state["memory"]),
            "memory_kv": None if kv is None else [(pick(k), pick(v)) for k, v in kv],
            "src_valid": pick(state["src_valid"]),
            "cache": cache,
        }
