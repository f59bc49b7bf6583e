"""The dense gate: every token to every expert with softmax weights (the start of EvoMoE's phase 2)."""

from __future__ import annotations

import torch

from ...config import RouterConfig
from ...registry import ROUTERS
from ..routing import Router, RouterContext, Routing, pairs_from_mask
from .gate import LinearGate, resolve_init


@ROUTERS.register("soft")
class SoftRouter(Router):
    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, **_: object) -> None:
        super().__init__(d_model, num_experts)
        self.gate = LinearGate(d_model, num_experts, resolve_init(cfg.gate_init, "normal"))

    def export_routing(self, hard: bool) -> tuple[int, bool]:  # noqa: ARG002
        return self.num_experts, False  # every expert, softmax weights

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        p_TE = torch.softmax(self.gate(x_TD), dim=-1)
        sel_TE = torch.ones_like(p_TE, dtype=torch.bool)
        if ctx.valid_T is not None:
            sel_TE = sel_TE & ctx.valid_T.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, p_TE)
        return Routing(token_P, expert_P, weight_P, probs_TE=p_TE.detach())
