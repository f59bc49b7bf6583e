"""FLOPs actually executed: dense parts per token, experts per computed (token, expert) pair.

Forward FLOPs are 2 per multiply-add; training counts forward + backward = 3x forward. Attention scores
count the causal average context (S+1)/2. The router counts 2*D*E per token in spawned layers. A task
says what a token costs outside the FFNs (``Task.forward_dense_flops``); the trainer adds the FFN rows
the model computed and the routers.
"""

from __future__ import annotations

from ..config import ModelConfig


def expert_pair_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of one expert (or one dense FFN) on one token."""
    h = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff
    return 2 * (cfg.d_model * h + cfg.d_ff * cfg.d_model)


def dense_token_flops(cfg: ModelConfig, seq_len: int, context: float | None = None) -> float:
    """Forward FLOPs per token outside the FFNs of a stack of ``cfg.n_layers`` self-attention blocks plus
    the output head: projections, scores over ``context`` keys (default: the causal mean (S+1)/2)."""
    D, L = cfg.d_model, cfg.n_layers
    ctx = (seq_len + 1) / 2 if context is None else context
    proj = 2 * 4 * D * D * L
    scores = 2 * 2 * D * ctx * L
    head = 2 * D * cfg.vocab_size
    return proj + scores + head


def step_flops(
    forward_dense: float, ffn_rows: float, router_tokens: float, cfg: ModelConfig, E: int
) -> float:
    """Training FLOPs of one step: the task's dense forward FLOPs, every FFN row computed (dense blocks:
    one per token; MoE blocks: one per routed pair), and the router on ``router_tokens`` tokens."""
    forward = forward_dense + ffn_rows * expert_pair_flops(cfg) + router_tokens * 2 * cfg.d_model * E
    return 3.0 * forward


def training_flops(
    cfg: ModelConfig, tokens: int, seq_len: int, ffn_pairs: float, router_tokens: float, E: int
) -> float:
    """A decoder LM's training FLOPs of one step (``tokens`` tokens of length-``seq_len`` windows)."""
    return step_flops(tokens * dense_token_flops(cfg, seq_len), ffn_pairs, router_tokens, cfg, E)
