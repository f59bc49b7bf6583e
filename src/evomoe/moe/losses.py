"""Auxiliary losses and routing statistics as pure functions.

Legend: T tokens, E experts. ``valid_T`` masks padding out of every mean.
"""

from __future__ import annotations

import torch


def masked_mean_T(x_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens of each column -> [E]."""
    if valid_T is None:
        return x_TE.mean(0)
    v = valid_T.to(x_TE.dtype).unsqueeze(1)
    return (x_TE * v).sum(0) / v.sum().clamp_min(1.0)


def load_balance_loss(prob_TE: torch.Tensor, assign_TE: torch.Tensor, valid_T=None) -> torch.Tensor:
    """E * sum_e mean_t(prob[:, e]) * mean_t(assign[:, e]); ``assign`` carries no gradient.

    Switch/GShard: prob = softmax, assign = one-hot of the first choice.
    DTS: prob = combine weights w, assign = the selection mask (equals E while every expert is selected).
    """
    E = prob_TE.shape[1]
    return (
        E
        * (
            masked_mean_T(prob_TE, valid_T) * masked_mean_T(assign_TE.detach().to(prob_TE.dtype), valid_T)
        ).sum()
    )


def router_z_loss(logits_TE: torch.Tensor, valid_T=None) -> torch.Tensor:
    """ST-MoE z-loss: mean_t logsumexp(z_t)^2."""
    lse_T1 = torch.logsumexp(logits_TE, dim=-1, keepdim=True) ** 2
    return masked_mean_T(lse_T1, valid_T).squeeze(0)


def entropy_T(prob_TE: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution."""
    return -(prob_TE * prob_TE.clamp_min(1e-20).log()).sum(-1)
