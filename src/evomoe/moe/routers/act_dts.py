"""Activation dense-to-sparse gate (Nguyen, Akbarian, Ho 2024): EvoMoE's DTS with an activation (gates (a)).

Scores a = sigma(W x) + b (``bias_inside_activation``: sigma(W x + b)), b a learned per-expert bias (zeros),
sigma from ``activation`` (tanh by default: bounded and non-polynomial, the kind the paper's independence
conditions admit; identity gives back the vanilla DTS gate). Then everything is the DTS gate on a:
y = softmax((a + Gumbel) / tau) with the ``[gate]`` schedule, soft phase keeps y > threshold, hard phase a
sampled top-1; combine weights softmax(a) masked, not renormalised; eval deterministic top-1 of a.
The paper fits tau as a parameter and has no aux loss; this keeps EvoMoE's schedule and offers the shared
balancing (balance.py: the bias, when on, shifts only the scores that select).
Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check, choice
from ...registry import ROUTERS
from ..balance import BalanceOptions, Balancer, balance_weights
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask, pairs_from_topk
from .gate import LinearGate, gumbel_like

ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda z: z, "gelu": F.gelu}


@dataclass
class ActDTSOptions(BalanceOptions):
    activation: str = "tanh"  # tanh | sigmoid | identity | gelu
    bias_inside_activation: bool = False
    threshold: float = 0.001
    gumbel: bool = True
    balance_weight: float = 0.0  # as the DTS gate: EvoMoE's own DTS runs used 0

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        choice(f"{prefix}.activation", self.activation, tuple(ACTIVATIONS))
        check(0.0 <= self.threshold < 1.0, f"{prefix}.threshold", self.threshold, "must be in [0, 1)")


class ActivationGate(nn.Module):
    def __init__(self, d_model: int, num_experts: int, init: str, opts: ActDTSOptions) -> None:
        super().__init__()
        self.linear = LinearGate(d_model, num_experts, init)
        self.bias = nn.Parameter(torch.zeros(num_experts))
        self.act, self.inside = ACTIVATIONS[opts.activation], opts.bias_inside_activation

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        z_TE = self.linear(x_TD)
        return self.act(z_TE + self.bias) if self.inside else self.act(z_TE) + self.bias


@ROUTERS.register("act_dts")
class ActDTSRouter(Router):
    Options = ActDTSOptions
    dense_to_sparse = True
    default_gate_init = "zeros"

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.gate = ActivationGate(spec.d_model, spec.num_experts, self.gate_init, self.opts)
        self.balancer = Balancer(spec.num_experts, self.opts)

    def loss_weights(self) -> dict[str, float]:
        return balance_weights(self.opts)

    def select(self, s_TE: torch.Tensor, ctx: RouterContext) -> torch.Tensor:
        """Selection mask (no gradient) from the selection scores."""
        E = self.num_experts
        if not self.training:
            return F.one_hot(s_TE.argmax(-1), E).bool()
        noisy = s_TE + gumbel_like(s_TE) if self.opts.gumbel else s_TE
        y_TE = torch.softmax(noisy / ctx.gate.tau, dim=-1)
        return F.one_hot(y_TE.argmax(-1), E).bool() if ctx.gate.hard else y_TE > self.opts.threshold

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        a_TE = self.gate(x_TD)
        p_TE = torch.softmax(a_TE, dim=-1)
        sel_TE = self.select(self.balancer.selection_scores(a_TE.detach()), ctx)
        v = ctx.valid_T
        one = ctx.gate.hard or not self.training
        if one and v is None:
            expert_T1 = sel_TE.to(torch.uint8).argmax(-1, keepdim=True)
            token_P, expert_P, weight_P = pairs_from_topk(expert_T1, p_TE.gather(1, expert_T1))
        else:
            sel_TE = sel_TE if v is None else sel_TE & v.unsqueeze(1)
            token_P, expert_P, weight_P = pairs_from_mask(sel_TE, p_TE * sel_TE)
        aux = self.balancer.losses(p_TE, sel_TE, a_TE, v, ctx.shape)
        return Routing(
            token_P,
            expert_P,
            weight_P,
            aux=aux,
            probs_TE=p_TE.detach(),
            fixed_k=1 if one and v is None else None,
        )

    def on_step(self, step: int) -> None:
        self.balancer.on_step()
