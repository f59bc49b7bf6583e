"""DSelect-k (Hazimeh et al. 2021): k binary-code selectors with smooth-step gates (spec gates (b)).

Per token: z = W_z x + b_z in R^{k*M} (M = ceil(log2 E)), w = W_w x + b_w in R^k. Selector i is a
distribution over the 2^M codes, r_i(l) = prod_j (S(z_ij) if bit_j(l) else 1 - S(z_ij)); the expert weights
q_e = sum_i softmax(w)_i r_i(e) for e < E. They sum to 1 when E is a power of 2, and once every S(z) is
0 or 1 each selector names one expert: at most k nonzeros. Before that the gate is dense: every pair with
q > 0 is computed (dense-to-sparse in routing space, no temperature). Same routing in training and eval.
Aux (unscaled): ``entropy`` = mean over tokens of sum_i H(r_i) (pushes S to binary values), ``reach`` =
mean over tokens of sum_i 1 / sum_{e<E} r_i(e) (only when E is not a power of 2: unreachable codes must
not absorb the mass; it equals k when they hold none), plus the shared ``balance`` / ``z`` (balance.py).
Legend: T tokens, D width, E experts, K selectors, M bits, C codes, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import check, finite_nonneg
from ...ops.smooth_step import num_bits, selector_probs, smooth_step
from ...registry import ROUTERS
from ..balance import BalanceOptions, Balancer, balance_weights, experts_if_selected
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask


@dataclass
class SmoothStepOptions(BalanceOptions):
    """What DSelect-k and COMET share: k selectors (trees) of smooth-step gates, an entropy push to binary."""

    k: int = 2
    gamma: float = 0.1  # smooth-step width; DSelect-k's Keras default is 1.0, COMET-BERT's LM runs 0.1
    entropy_weight: float = 0.1  # DSelect-k's default 1e-6 is for recommenders; COMET-BERT's LM 0.1
    balance_weight: float = 0.0

    supports_bias = False
    supports_z = False

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        E = experts_if_selected(cfg, prefix)
        check(1 <= self.k <= E, f"{prefix}.k", self.k, f"must be in [1, num_experts={E}]")
        check(self.gamma > 0, f"{prefix}.gamma", self.gamma, "must be > 0")
        finite_nonneg(prefix, self, ("entropy_weight",))


@dataclass
class DSelectKOptions(SmoothStepOptions):
    reach_weight: float = 1.0  # non-power-of-2 E only

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        finite_nonneg(prefix, self, ("reach_weight",))


def selector_entropy(r_TKC: torch.Tensor) -> torch.Tensor:
    """sum over selectors and codes of -r log(r + 1e-6), per token -> [T]."""
    return -(r_TKC * torch.log(r_TKC + 1e-6)).sum((1, 2))


@ROUTERS.register("dselect_k")
class DSelectKRouter(Router):
    Options = DSelectKOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        E, D, o = spec.num_experts, spec.d_model, self.opts
        self.bits, self.k = num_bits(E), min(o.k, E)
        self.z = nn.Linear(D, self.k * self.bits)
        self.w = nn.Linear(D, self.k)
        nn.init.uniform_(self.z.weight, -o.gamma / 100, o.gamma / 100)
        nn.init.uniform_(self.z.bias, -o.gamma / 100, o.gamma / 100)
        nn.init.uniform_(self.w.weight, -0.05, 0.05)
        nn.init.zeros_(self.w.bias)
        self.balancer = Balancer(E, o)

    def loss_weights(self) -> dict[str, float]:
        w = {"entropy": self.opts.entropy_weight, **balance_weights(self.opts)}
        if self.num_experts < 2**self.bits:  # only then does it return the reachability loss
            w["reach"] = self.opts.reach_weight
        return w

    def weights(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] expert weights q and the selectors' code distributions [T, K, C], in float32."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.float()
            s_TKM = smooth_step(self.z(x).view(-1, self.k, self.bits), self.opts.gamma)
            r_TKC = selector_probs(s_TKM)
            mix_TK = torch.softmax(self.w(x), dim=-1)
        q_TE = (mix_TK.unsqueeze(-1) * r_TKC).sum(1)[:, : self.num_experts]
        return q_TE, r_TKC

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        q_TE, r_TKC = self.weights(x_TD)
        sel_TE = q_TE.detach() > 0
        if ctx.valid_T is not None:
            sel_TE = sel_TE & ctx.valid_T.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, q_TE)
        v = ctx.valid_T
        mean_T = lambda x_T: x_T.mean() if v is None else (x_T * v).sum() / v.sum().clamp_min(1)  # noqa: E731
        aux = {"entropy": mean_T(selector_entropy(r_TKC))}
        if self.num_experts < r_TKC.shape[-1]:
            aux["reach"] = mean_T((1.0 / r_TKC[..., : self.num_experts].sum(-1).clamp_min(1e-6)).sum(-1))
        probs_TE = q_TE / q_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        aux.update(self.balancer.losses(probs_TE, sel_TE, None, v, ctx.shape))
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=probs_TE.detach())

    def on_step(self, step: int) -> None:
        self.balancer.on_step()
