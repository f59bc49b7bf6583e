"""BASE layers (Lewis et al. 2021): balanced assignment of tokens to experts by centroid affinity (spec 5).

Affinity a[t, e] = x_t . c_e with learned centroids c_e (orthogonal init, gain 0.1), in float32. The
choice of expert carries no gradient. Training: every expert gets exactly T/E of the valid tokens
(``ops.auction``: when E does not divide T, the first T % E experts get one token more), maximising the
total affinity exactly (auction prices, then successive shortest paths; no heuristic fallback at any
T/E, so there is nothing to count in the metrics). Evaluation: greedy top-1, no balancing. The pair's
weight is sigmoid(x_t . c_e) with gradient: the centroids learn only through it. The spec's output
x + sigmoid(x . c_e) * FFN_e(x) comes from the transformer block's residual, which supplies the "x +";
the MoE layer returns only the weighted FFN term. No aux loss. Padding (``ctx.valid_T`` False) is
neither routed nor counted in the balance.
Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import check, finite_nonneg
from ...ops.auction import balanced_assignment
from ...registry import ROUTERS
from ..router import Router, RouterContext, RouterSpec, Routing, valid_tokens


class CentroidGate(nn.Module):
    """Expert centroids c_e ([E, D], orthogonal init with gain 0.1); forward gives x . c_e in float32."""

    def __init__(self, d_model: int, num_experts: int, gain: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        self.gain = gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.weight, gain=self.gain)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return x_TD.float() @ self.weight.float().t()


def sigmoid_pairs(logits_TE: torch.Tensor, token_P: torch.Tensor, expert_P: torch.Tensor) -> torch.Tensor:
    """weight_P = sigmoid(logits[t, e]) of each pair, with gradient to x and the centroids."""
    return torch.sigmoid(logits_TE[token_P, expert_P])


@dataclass
class BaseOptions:
    auction_eps: float = 0.0  # 0: chosen from the affinities' scale
    auction_iters: int = 200

    def validate(self, cfg, prefix: str) -> None:
        check(self.auction_iters >= 1, f"{prefix}.auction_iters", self.auction_iters, "must be >= 1")
        finite_nonneg(prefix, self, ("auction_eps",))


@ROUTERS.register("base")
class BaseLayerRouter(Router):
    Options = BaseOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.cfg = self.opts
        self.centroids = CentroidGate(spec.d_model, spec.num_experts)

    def assign(self, a_PE: torch.Tensor) -> torch.Tensor:
        """Expert of each routed token: balanced auction in training, greedy top-1 in evaluation."""
        if not self.training:
            return a_PE.argmax(-1)
        return balanced_assignment(a_PE, eps=self.cfg.auction_eps, max_iters=self.cfg.auction_iters)

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        logits_TE = self.centroids(x_TD)
        a_TE = logits_TE.detach()
        token_P = valid_tokens(ctx, x_TD.shape[0], x_TD.device)
        expert_P = self.assign(a_TE.index_select(0, token_P))
        weight_P = sigmoid_pairs(logits_TE, token_P, expert_P)
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        return Routing(token_P, expert_P, weight_P, probs_TE=torch.softmax(a_TE, -1), dropped=dropped)
