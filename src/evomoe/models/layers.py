"""Pieces of the two decoder styles the ecosystem serves: GPT-2 (LayerNorm, learned positions) and Llama
(RMSNorm, rotary positions; with grouped-query attention in ``blocks.Attention``). Biases are options
(GPT-2 has them all, Qwen2 only on q/k/v). A key-value cache makes incremental decoding cost one
position per step.

Legend: B batch, S new positions, L cached + new positions, D width, H query heads, K key/value heads,
Dh head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 (as Llama's reference does) and cast back."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.style == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rotary_cos_sin(
    positions_S: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh] for rotary positions; the two halves of a head rotate together (HF's layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles_SF = positions_S.float().unsqueeze(1) * inv_freq.to(positions_S.device).unsqueeze(0)
    angles_SDh = torch.cat([angles_SF, angles_SF], dim=-1)
    return angles_SDh.cos(), angles_SDh.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    half = x_BHSDh.shape[-1] // 2
    rotated = torch.cat([-x_BHSDh[..., half:], x_BHSDh[..., :half]], dim=-1)
    return (x_BHSDh.float() * cos_SDh + rotated.float() * sin_SDh).to(x_BHSDh.dtype)


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, one entry per block: [B, K, L, Dh] each."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0  # positions cached (the offset of the next new position)

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers, 0)

    def extend(self, layer: int, k_BKSDh: torch.Tensor, v_BKSDh: torch.Tensor):
        """Append this step's keys/values for ``layer``; returns all of them [B, K, L, Dh]."""
        if self.keys[layer] is not None:
            k_BKSDh = torch.cat([self.keys[layer], k_BKSDh], dim=2)
            v_BKSDh = torch.cat([self.values[layer], v_BKSDh], dim=2)
        self.keys[layer], self.values[layer] = k_BKSDh, v_BKSDh
        return k_BKSDh, v_BKSDh


def attend_cached(q_BHSDh, k_BHLDh, v_BHLDh, offset: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of S new queries at positions offset.. (> 0) over L = offset + S keys."""
    S, L = q_BHSDh.shape[2], k_BHLDh.shape[2]
    if S == 1:  # one new position sees every cached one
        return F.scaled_dot_product_attention(q_BHSDh, k_BHLDh, v_BHLDh, dropout_p=dropout_p)
    allowed_SL = torch.ones(S, L, dtype=torch.bool, device=q_BHSDh.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(
        q_BHSDh, k_BHLDh, v_BHLDh, attn_mask=allowed_SL, dropout_p=dropout_p
    )
