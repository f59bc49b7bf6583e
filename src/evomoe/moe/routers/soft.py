"""The dense gate: every token to every expert with softmax weights (the start of EvoMoE's phase 2)."""

from __future__ import annotations

import torch

from ...registry import ROUTERS
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask
from .gate import LinearGate


@ROUTERS.register("soft")
class SoftRouter(Router):
    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)

    def export_routing(self, hard: bool) -> tuple[int, bool]:  # noqa: ARG002
        return self.num_experts, False  # every expert, softmax weights

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        p_TE = torch.softmax(self.gate(x_TD), dim=-1)
        sel_TE = torch.ones_like(p_TE, dtype=torch.bool)
        if ctx.valid_T is not None:
            sel_TE = sel_TE & ctx.valid_T.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, p_TE)
        return Routing(token_P, expert_P, weight_P, probs_TE=p_TE.detach())
