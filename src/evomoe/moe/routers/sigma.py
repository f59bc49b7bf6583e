"""Sigma-MoE-Tiny's router: softmax top-k with per-layer k that steps down in stages (spec gates (c)).

p = softmax(z) in float32 *before* selection (Megatron's pre-softmax), the k_l largest are kept and the
weights are those probabilities, not renormalised: with k = 1 a post-softmax weight would be 1 for every
token and the router would learn only from the balance loss. ``stages``: "step:k0,k1,...; step:..." -
from each step (counted from the spawn, like the gate's clock) MoE layer l uses the l-th k of that stage
(the last one repeats for deeper layers). The source's per-layer values and switch points were not
published: the default keeps the lowest MoE layer at k = 2 (the commit that added per-layer k says more
experts in shallow layers stabilise training) and switches every layer to k = 1 after 500 steps.
``selection = stat_topk`` swaps the sort for the statistical top-k threshold with the same target k.
Balance loss (global by default, as Sigma's fork adds), z-loss and aux-loss-free bias: balance.py.
Legend: T tokens, D width, E experts, K = k, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import check, choice
from ...config.errors import ConfigError
from ...ops.stat_topk import stat_topk_mask
from ...registry import ROUTERS
from ..balance import BalanceOptions, Balancer, balance_weights, experts_if_selected
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask, pairs_from_topk
from .gate import LinearGate


def parse_stages(text: str, field_: str = "stages") -> list[tuple[int, list[int]]]:
    """ "0:2,1; 500:1" -> [(0, [2, 1]), (500, [1])], ascending steps, the first at step 0."""
    stages = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        step, sep, ks = part.partition(":")
        try:
            stages.append((int(step), [int(k) for k in ks.split(",")]))
        except ValueError:
            raise ConfigError(f"{field_} = {text!r}: write stages as 'step:k0,k1,...; step:...'") from None
        if not sep:
            raise ConfigError(f"{field_} = {text!r}: stage {part!r} has no ':'")
    steps = [s for s, _ in stages]
    if not stages or steps[0] != 0 or steps != sorted(set(steps)):
        raise ConfigError(f"{field_} = {text!r}: steps must start at 0 and increase")
    return stages


def stage_k(stages: list[tuple[int, list[int]]], u: int, layer: int) -> int:
    """k of MoE layer ``layer`` at step ``u`` (from the spawn)."""
    ks = [ks for start, ks in stages if start <= u][-1]
    return ks[min(layer, len(ks) - 1)]


@dataclass
class SigmaOptions(BalanceOptions):
    stages: str = "0:2,1; 500:1"
    selection: str = "topk"  # topk | stat_topk
    renormalize: bool = False
    balance: str = "global"

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        choice(f"{prefix}.selection", self.selection, ("topk", "stat_topk"))
        E = experts_if_selected(cfg, prefix)
        for _, ks in parse_stages(self.stages, f"{prefix}.stages"):
            check(all(1 <= k <= E for k in ks), f"{prefix}.stages", self.stages, f"every k in [1, {E}]")


@ROUTERS.register("sigma")
class SigmaRouter(Router):
    Options = SigmaOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.stages = parse_stages(self.opts.stages)
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)
        self.balancer = Balancer(spec.num_experts, self.opts)

    def loss_weights(self) -> dict[str, float]:
        return balance_weights(self.opts)

    def current_k(self, ctx: RouterContext) -> int:
        k = stage_k(self.stages, ctx.gate.step - ctx.gate.spawn_step, self.spec.layer_idx)
        return min(k, self.num_experts)

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        z_TE = self.gate(x_TD)
        p_TE = torch.softmax(z_TE, dim=-1)
        s_TE = self.balancer.selection_scores(z_TE.detach())
        k, v = self.current_k(ctx), ctx.valid_T
        if self.opts.selection == "stat_topk" and k < self.num_experts:
            sel_TE = stat_topk_mask(s_TE, k, min_keep=1)
            w_TE = p_TE * sel_TE
            if self.opts.renormalize:
                w_TE = w_TE / w_TE.sum(-1, keepdim=True).clamp_min(1e-9)
            if v is not None:
                sel_TE = sel_TE & v.unsqueeze(1)
            token_P, expert_P, weight_P = pairs_from_mask(sel_TE, w_TE)
            fixed_k = None
        else:
            expert_TK = s_TE.topk(k, dim=-1).indices
            weight_TK = p_TE.gather(1, expert_TK)
            if self.opts.renormalize and k > 1:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-9)
            keep_TK = None if v is None else v.unsqueeze(1).expand_as(expert_TK)
            token_P, expert_P, weight_P = pairs_from_topk(expert_TK, weight_TK, keep_TK)
            sel_TE = F.one_hot(expert_TK, self.num_experts).sum(1).bool()
            fixed_k = k if v is None else None
        aux = self.balancer.losses(p_TE, sel_TE, z_TE, v, ctx.shape)
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=p_TE.detach(), fixed_k=fixed_k)

    def on_step(self, step: int) -> None:
        self.balancer.on_step()
