"""COMET (Ibrahim et al. 2023): k soft binary trees, one joint softmax, a learned permutation (gates (b)).

Tree j (heap order, V = 2^M - 1 internal nodes, M = ceil(log2 E)): node v sends a token left with
r = S(w_{j,v}.x + b) (smooth-step), right with 1 - r; P_j(l) is the product along leaf l's path. Each leaf
l < E has a linear logit a_{j,l} = o_{j,l}.x + c_{j,l}. One softmax over all k*E scores a + log P, with
leaves of P < ``min_reach`` left out (-inf): g_{j,l} = P_j(l) e^a / sum P e^a. The permutation maps leaf
to expert, q_e = sum_j sum_l g_{j,l} Pi_j[l, e], then q / sum q. Once the smooth-steps saturate each tree
reaches one leaf, so q has at most k nonzeros. Pairs: every q > 0 (dense until saturation).
Aux (unscaled): ``entropy`` = sum over leaves and trees of -P log P, mean over tokens; ``perm_entropy``
while the permutation learns; plus the shared ``balance`` / ``z``.
Legend: T tokens, D width, E experts, K trees, V internal nodes, C leaves (2^M), P pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...config import check, finite_nonneg
from ...ops.smooth_step import num_bits, smooth_step, tree_reach_probs
from ...registry import ROUTERS
from ..balance import Balancer, balance_weights
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask
from .dselect_k import SmoothStepOptions
from .permutation import LearnedPermutation


@dataclass
class CometOptions(SmoothStepOptions):
    # gamma 0.1 and entropy_weight 0.1 (the tree entropy, COMET-BERT's "load balance" slot) are COMET-BERT's
    # LM port's; the recommender runs tune gamma 5-10
    min_reach: float = 1e-5  # the PyTorch port's cut; the TF code uses P > 0
    perm_steps: int = 100  # steps (after the spawn) the permutation learns; 0: identity, no permutation
    per_tree_permutation: bool = False  # learn_k_permutations
    perm_entropy_weight: float = 1e-4  # zeta
    log10_tau_start: float = -3.0
    log10_tau_end: float = -7.0
    iters_start: int = 20
    iters_end: int = 150
    perm_noise: float = 0.0

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        check(0.0 <= self.min_reach < 1.0, f"{prefix}.min_reach", self.min_reach, "must be in [0, 1)")
        check(self.perm_steps >= 0, f"{prefix}.perm_steps", self.perm_steps, "must be >= 0")
        for name in ("iters_start", "iters_end"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        finite_nonneg(prefix, self, ("perm_entropy_weight", "perm_noise"))


@ROUTERS.register("comet")
class CometRouter(Router):
    Options = CometOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        E, D, o = spec.num_experts, spec.d_model, self.opts
        self.depth, self.k = num_bits(E), min(o.k, E)
        self.nodes = nn.Linear(D, self.k * (2**self.depth - 1))
        self.leaves = nn.Linear(D, self.k * E)
        nn.init.uniform_(self.nodes.weight, -o.gamma / 100, o.gamma / 100)
        nn.init.uniform_(self.nodes.bias, -o.gamma / 100, o.gamma / 100)
        nn.init.uniform_(self.leaves.weight, -0.05, 0.05)
        nn.init.zeros_(self.leaves.bias)
        self.perm = LearnedPermutation(self.k if o.per_tree_permutation else 1, E, o)
        self.balancer = Balancer(E, o)

    def loss_weights(self) -> dict[str, float]:
        o = self.opts
        return {"entropy": o.entropy_weight, "perm_entropy": o.perm_entropy_weight, **balance_weights(o)}

    def gate(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint softmax g [T, K, E] (leaf space) and the reach probabilities P [T, K, E], float32."""
        T, K, E = x_TD.shape[0], self.k, self.num_experts
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.float()
            r_TKV = smooth_step(self.nodes(x).view(T, K, -1), self.opts.gamma)
            reach_TKE = tree_reach_probs(r_TKV)[..., :E]
            a_TKE = self.leaves(x).view(T, K, E)
        live = reach_TKE > max(self.opts.min_reach, 0.0)
        score = torch.where(live, a_TKE + torch.log(reach_TKE.clamp_min(1e-30)), -math.inf)
        g_TKE = torch.softmax(score.view(T, K * E), -1).view(T, K, E)
        return torch.nan_to_num(g_TKE, nan=0.0), reach_TKE

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        g_TKE, reach_TKE = self.gate(x_TD)
        pi_GEE, perm_ent = self.perm.matrix()
        q_TE = torch.einsum("tkl,kle->te", g_TKE, pi_GEE.expand(self.k, -1, -1))
        q_TE = q_TE / q_TE.sum(-1, keepdim=True).clamp_min(1e-12)
        sel_TE = q_TE.detach() > 0
        v = ctx.valid_T
        if v is not None:
            sel_TE = sel_TE & v.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, q_TE)
        ent_T = -(reach_TKE * torch.log(reach_TKE.clamp_min(1e-30))).sum((1, 2))
        aux = {"entropy": ent_T.mean() if v is None else (ent_T * v).sum() / v.sum().clamp_min(1)}
        aux["perm_entropy"] = perm_ent if perm_ent is not None else q_TE.sum() * 0.0
        aux.update(self.balancer.losses(q_TE, sel_TE, None, v, ctx.shape))
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=q_TE.detach())

    def on_step(self, step: int) -> None:
        self.perm.on_step()
        self.balancer.on_step()
