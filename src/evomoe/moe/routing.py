"""The router interface: routers turn hidden states into (token, expert, weight) pairs.

Legend: T tokens (flattened B*S), E experts, D model width, P routed (token, expert) pairs.
A router may give a token any number of experts, 0..E; the dispatcher computes exactly the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class GateState:
    """Schedule values the trainer hands to every router for the current step."""

    tau: float = 1.0
    hard: bool = False
    step: int = 0
    stage: int = 1  # StableMoE: 1 (learn routing) or 2 (frozen distilled router)


@dataclass
class RouterContext:
    """What a router may need beyond the hidden states."""

    gate: GateState = field(default_factory=GateState)
    token_ids_T: torch.Tensor | None = None  # long, the input token ids (hash, StableMoE)
    valid_T: torch.Tensor | None = None  # bool, False for padding: never routed, not in aux losses
    layer_idx: int = 0
    shape: tuple[int, int] | None = None  # (B, S)


@dataclass
class Routing:
    """Router output. ``weight_P`` carries the gate's gradient; the indices carry none.

    aux: unscaled auxiliary losses by name (coefficients live in the config).
    probs_TE: the router's clean distribution over experts (detached), for entropy stats; or None.
    dropped: count of (token, expert) pairs a router chose but dropped for capacity, as a 0-d tensor.
    fixed_k: set when every token has exactly this many pairs in token-major order (pair p belongs to
    token p // fixed_k); the dispatcher then folds rows back by a reshape instead of a sort by token.
    """

    token_idx_P: torch.Tensor
    expert_idx_P: torch.Tensor
    weight_P: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    probs_TE: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    fixed_k: int | None = None


class Router(nn.Module):
    """Base class. Subclasses implement ``forward(x_TD, ctx) -> Routing``."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts

    def loss_weights(self) -> dict[str, float]:
        """Coefficient of each aux loss this router returns (names as in ``Routing.aux``)."""
        return {}

    def export_routing(self, hard: bool) -> tuple[int, bool]:
        """Evaluation routing as ``softmax(x W_g)``, top-k, weights renormalised or not: (k, renormalised),
        the semantics of the Hugging Face MoE classes. ``hard``: the gate's one-way hard flag at the
        checkpoint. Raises ValueError saying why a router's routing is not of that form."""
        raise ValueError(f"{type(self).__name__} routing is not a softmax top-k of a linear gate")

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:  # pragma: no cover
        raise NotImplementedError


def pairs_from_mask(mask_TE: torch.Tensor, weight_TE: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Selected (token, expert) pairs of a boolean mask, token-major order, with their weights."""
    token_idx_P, expert_idx_P = mask_TE.nonzero(as_tuple=True)
    return token_idx_P, expert_idx_P, weight_TE[token_idx_P, expert_idx_P]


def pairs_from_topk(expert_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor | None = None):
    """Pairs from a [T, K] choice of experts; ``keep_TK`` drops pairs (capacity, padding)."""
    T, K = expert_TK.shape
    token_TK = torch.arange(T, device=expert_TK.device).unsqueeze(1).expand(T, K)
    if keep_TK is None:
        return token_TK.reshape(-1), expert_TK.reshape(-1), weight_TK.reshape(-1)
    return token_TK[keep_TK], expert_TK[keep_TK], weight_TK[keep_TK]
