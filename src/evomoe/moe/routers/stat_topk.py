"""A softmax router whose selection is statistical top-k (Spark Transformer) instead of a sort (gates (e)).

z = W x (float32), p = softmax(z). Expert e is selected when z_e > mean(z) + std(z) * Phi^-1(1 - k/E)
(``ops/stat_topk.py``): about ``k`` experts per token, a random number of them; the token's best expert is
always kept (``min_keep = 1``: a token with no expert would lose its FFN; ties: the lowest index). Weights:
p of the selected experts, or ``weights = shifted``: ReLU(z - theta), Spark's soft threshold (theta from
the unbiased z). An expert kept only by ``min_keep`` (or moved over theta only by the selection bias) sits
at or below theta, where the soft threshold is 0: a token with such an expert takes p on its kept experts
instead, so every kept expert has a positive weight with a gradient. ``renormalize`` (either kind) divides
by the sum over the kept experts; off by default: a lone survivor would get weight 1 and no gradient.
The same in training and eval.
With E <= 128 the Gaussian fit of E logits is rough: log the realised experts per token (mean, std, max).
Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import check, choice
from ...ops.stat_topk import stat_topk_mask, stat_topk_threshold
from ...registry import ROUTERS
from ..balance import BalanceOptions, Balancer, balance_weights, experts_if_selected
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask
from .gate import LinearGate


@dataclass
class StatTopkOptions(BalanceOptions):
    k: float = 2.0  # target experts per token
    weights: str = "softmax"  # softmax | shifted
    renormalize: bool = False  # weights (either kind) divided by their sum over the selected experts
    min_keep: int = 1

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        E = experts_if_selected(cfg, prefix)
        check(0 < self.k < E or E == 1, f"{prefix}.k", self.k, f"must be in (0, num_experts={E})")
        choice(f"{prefix}.weights", self.weights, ("softmax", "shifted"))
        check(0 <= self.min_keep <= E, f"{prefix}.min_keep", self.min_keep, f"must be in [0, {E}]")


def shifted_weights(z_TE: torch.Tensor, p_TE: torch.Tensor, sel_TE: torch.Tensor, k: float) -> torch.Tensor:
    """ReLU(z - theta) on the selected experts; a token with a selected expert at or below theta (kept by
    min_keep or the bias, where the soft threshold gives 0) takes p on its selected experts instead."""
    r_TE = torch.relu(z_TE - stat_topk_threshold(z_TE, k)) * sel_TE
    short_T1 = ((r_TE <= 0) & sel_TE).any(-1, keepdim=True)
    return torch.where(short_T1, p_TE * sel_TE, r_TE)


@ROUTERS.register("stat_topk")
class StatTopkRouter(Router):
    Options = StatTopkOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)
        self.balancer = Balancer(spec.num_experts, self.opts)

    def loss_weights(self) -> dict[str, float]:
        return balance_weights(self.opts)

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        o, E = self.opts, self.num_experts
        z_TE = self.gate(x_TD)
        p_TE = torch.softmax(z_TE, dim=-1)
        s_TE = self.balancer.selection_scores(z_TE.detach())
        k = min(o.k, E - 0.5)
        sel_TE = stat_topk_mask(s_TE, k, o.min_keep) if E > 1 else torch.ones_like(s_TE, dtype=torch.bool)
        w_TE = shifted_weights(z_TE, p_TE, sel_TE, k) if o.weights == "shifted" else p_TE * sel_TE
        if o.renormalize:
            w_TE = w_TE / w_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        if ctx.valid_T is not None:
            sel_TE = sel_TE & ctx.valid_T.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, w_TE)
        aux = self.balancer.losses(p_TE, sel_TE, z_TE, ctx.valid_T, ctx.shape)
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=p_TE.detach())

    def on_step(self, step: int) -> None:
        self.balancer.on_step()
