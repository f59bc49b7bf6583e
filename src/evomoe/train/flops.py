"""FLOPs actually executed: dense parts per token, experts per computed (token, expert) pair.

Forward FLOPs are 2 per multiply-add; training counts forward + backward = 3x forward. Attention
scores count the causal average context (S+1)/2. The router counts 2*D*E per token in spawned layers.
"""

from __future__ import annotations

from ..config import ModelConfig


def expert_pair_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of one expert on one token."""
    h = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff
    return 2 * (cfg.d_model * h + cfg.d_ff * cfg.d_model)


def dense_token_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token outside the FFNs: attention projections, scores, and the LM head."""
    D, L = cfg.d_model, cfg.n_layers
    proj = 2 * 4 * D * D * L
    scores = 2 * 2 * D * (seq_len + 1) / 2 * L
    head = 2 * D * cfg.vocab_size
    return proj + scores + head


def training_flops(
    cfg: ModelConfig, tokens: int, seq_len: int, ffn_pairs: float, router_tokens: float, E: int
):
    """Training FLOPs of one step: ``ffn_pairs`` counts every FFN row computed (dense blocks: one per token),
    ``router_tokens`` the tokens routed summed over spawned MoE layers."""
    forward = tokens * dense_token_flops(cfg, seq_len) + ffn_pairs * expert_pair_flops(cfg)
    forward += router_tokens * 2 * cfg.d_model * E
    return 3.0 * forward
