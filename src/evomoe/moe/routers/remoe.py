"""ReMoE (Wang et al. 2025): ReLU routing with an adaptive, load-weighted L1 penalty (gates (h)).

R = ReLU(W x) (float32, no softmax, no top-k): expert e runs for a token when R_e > 0, with weight R_e.
Aux ``l1`` (unscaled) = mean over valid tokens of sum_e f_e R_e with f_e = E / (k T) * (tokens routed to e)
(no gradient through f). Its coefficient adapts after every optimizer step:
lambda <- lambda * alpha^sign(target - sparsity), target = 1 - k/E, sparsity = 1 - pairs / (T E) of the
step; so training goes dense warm-up -> sparsifying -> about k experts per token. ``lambda_scope``:
``model`` (the source's, default): one lambda for the model, driven by the sparsity of all layers together
(the model's l1 is the mean of the layers', as every aux loss here), so the model's mean is about k and
each layer finds its own density; ``layer``: every layer has its own lambda, driven by its own sparsity,
so each layer settles at about k (measured in docs/routers.md: the source's choice had the lower loss).
lambda and the step's counts are persistent buffers (with ``model`` each layer holds the same lambda).
The gate starts N(0, 0.02) (a zero gate would route nothing and never learn). Shared ``balance`` / ``z`` as
well (balance.py; off by default, the L1 term already balances).
Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import check, choice
from ...registry import ROUTERS
from ..balance import BalanceOptions, Balancer, balance_weights, experts_if_selected
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask
from .gate import LinearGate


@dataclass
class ReMoEOptions(BalanceOptions):
    k: float = 1.0  # target experts per token
    alpha: float = 1.2
    lambda_init: float = 1e-8
    lambda_scope: str = "model"  # model: one lambda for all layers (the source) | layer: one per layer
    balance_weight: float = 0.0

    supports_bias = False

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        E = experts_if_selected(cfg, prefix)
        check(0 < self.k <= E, f"{prefix}.k", self.k, f"must be in (0, num_experts={E}]")
        check(self.alpha >= 1.0, f"{prefix}.alpha", self.alpha, "must be >= 1")
        check(self.lambda_init > 0, f"{prefix}.lambda_init", self.lambda_init, "must be > 0")
        choice(f"{prefix}.lambda_scope", self.lambda_scope, ("layer", "model"))


def remoe_l1(r_TE: torch.Tensor, sel_TE: torch.Tensor, k: float, valid_T=None) -> torch.Tensor:
    """mean_t sum_e f_e R[t, e], f_e = E / (k T) * count_e over the valid tokens."""
    T_all, E = r_TE.shape
    v = torch.ones(T_all, device=r_TE.device) if valid_T is None else valid_T.float()
    T = v.sum().clamp_min(1.0)
    f_E = E / (k * T) * (sel_TE.detach().float() * v.unsqueeze(1)).sum(0)
    return ((r_TE * f_E).sum(-1) * v).sum() / T


def adapt_lambda(lam: float, alpha: float, target: float, sparsity: float) -> float:
    sign = (target > sparsity) - (target < sparsity)
    return lam * alpha**sign


@ROUTERS.register("remoe")
class ReMoERouter(Router):
    Options = ReMoEOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)
        self.balancer = Balancer(spec.num_experts, self.opts)
        self.register_buffer("lam", torch.tensor(self.opts.lambda_init, dtype=torch.float64))
        self.register_buffer("step_pairs", torch.zeros((), dtype=torch.float64))
        self.register_buffer("step_slots", torch.zeros((), dtype=torch.float64))
        self.group: list[ReMoERouter] = [self]  # the routers that share lambda (``link``)

    def link(self, routers: list) -> None:
        if self.opts.lambda_scope == "model":
            self.group = [r for r in routers if isinstance(r, ReMoERouter)]

    def loss_weights(self) -> dict[str, float]:
        return {"l1": float(self.lam), **balance_weights(self.opts)}

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        z_TE = self.gate(x_TD)
        r_TE = torch.relu(z_TE)
        sel_TE = r_TE.detach() > 0
        v = ctx.valid_T
        if v is not None:
            sel_TE = sel_TE & v.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, r_TE)
        if self.training and torch.is_grad_enabled():
            n_valid = sel_TE.shape[0] if v is None else v.sum()
            self.step_pairs += sel_TE.sum()
            self.step_slots += n_valid * self.num_experts
        probs_TE = torch.softmax(z_TE, dim=-1)
        aux = {"l1": remoe_l1(r_TE, sel_TE, min(self.opts.k, self.num_experts), v)}
        aux.update(self.balancer.losses(probs_TE, sel_TE, z_TE, v, ctx.shape))
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=probs_TE.detach())

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        """The group's first router adapts every member's lambda from the group's pairs of the step (the
        trainer calls every layer's hook after each step); the others only move their balancing state."""
        if self.group[0] is self:
            pairs = sum(float(r.step_pairs) for r in self.group)
            slots = sum(float(r.step_slots) for r in self.group)
            if slots > 0:
                target = 1.0 - min(self.opts.k, self.num_experts) / self.num_experts
                lam = adapt_lambda(float(self.lam), self.opts.alpha, target, 1.0 - pairs / slots)
                for r in self.group:
                    r.lam.fill_(lam)
            for r in self.group:
                r.step_pairs.zero_()
                r.step_slots.zero_()
        self.balancer.on_step()
