"""Top-k routers: Switch (k=1) and GShard (k=2), with optional capacity and token dropping.

Capacity C = k * ceil(capacity_factor * T / E) pairs per expert (Switch: ceil(cf*T/E), GShard: 2*ceil(T/E);
capacity_factor 0: dropless). Pairs past capacity are dropped in priority order: all first choices (in
token order) before any second choice.
A dropped pair contributes nothing; the block's residual carries the token. Legend: T, E, K = k, P pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import check, choice, finite_nonneg
from ...registry import ROUTERS
from ..balance import BALANCE_KINDS, BalanceOptions, Balancer
from ..losses import load_balance_loss, router_z_loss
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_topk
from .gate import LinearGate, gumbel_like


def capacity_keep(
    expert_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which pairs fit: position of each pair in its expert's queue, choice-rank major, token order minor."""
    T, K = expert_TK.shape
    onehot_KTE = F.one_hot(expert_TK.t(), num_experts) * keep_TK.t().unsqueeze(-1)
    pos_KTE = torch.cumsum(onehot_KTE.reshape(K * T, num_experts), 0).reshape(K, T, num_experts) - 1
    pos_TK = (pos_KTE * onehot_KTE).sum(-1).t()
    return keep_TK & (pos_TK < capacity)


def second_choice(z_TE: torch.Tensor, p_TE: torch.Tensor, first_T: torch.Tensor, policy: str, training: bool):
    """GShard's second expert and whether to keep it (None: kept for every token)."""
    first_mask = F.one_hot(first_T, z_TE.shape[1]).bool()
    keep_T = None  # every second choice kept
    if policy == "sampling" and training:
        second_T = (z_TE + gumbel_like(z_TE)).masked_fill(first_mask, float("-inf")).argmax(-1)
    else:
        second_T = p_TE.masked_fill(first_mask, float("-inf")).argmax(-1)
        if policy == "random" and training:
            p2_T = p_TE.gather(1, second_T.unsqueeze(1)).squeeze(1)
            keep_T = 2 * p2_T.detach() > torch.rand_like(p2_T)
    return second_T, keep_T


def chosen_pairs(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """[T, E] how many of each token's kept choices (before capacity) went to each expert."""
    kept_TK = torch.ones_like(expert_TK, dtype=torch.float32) if keep_TK is None else keep_TK.float()
    out_TE = torch.zeros(expert_TK.shape[0], num_experts, device=expert_TK.device)
    return out_TE.scatter_add_(1, expert_TK, kept_TK)


@dataclass
class TopKOptions:
    k: int = 1
    capacity_factor: float = 0.0  # 0 means dropless
    second_policy: str = "all"  # all | sampling | random (k == 2 only)
    renormalize: bool = True  # k >= 2: weights divided by their sum over the chosen experts
    aux_weight: float = 0.01
    z_loss_weight: float = 0.0
    balance: str = "batch"  # none | batch | sequence | global (moe/balance.py; f: first choices per token)
    bias_rate: float = 0.0  # aux-loss-free selection bias step (DeepSeek-V3: 0.001); 0: off
    # k == 1: the chosen expert's weight. prob: its gate probability p (Switch; with a near-uniform gate the
    # output starts at about 1/E of the expert's); normalized: p / detached p (value 1, gradient d log p);
    # straight_through: 1 + p - detached p (value 1, gradient dp)
    top1_weight: str = "prob"

    def validate(self, cfg, prefix: str) -> None:
        choice(f"{prefix}.balance", self.balance, BALANCE_KINDS)
        choice(f"{prefix}.top1_weight", self.top1_weight, TOP1_WEIGHTS)
        E = cfg.moe.num_experts
        check(1 <= self.k <= E, f"{prefix}.k", self.k, f"must be in [1, num_experts={E}]")
        check(
            self.capacity_factor >= 0.0,
            f"{prefix}.capacity_factor",
            self.capacity_factor,
            "must be >= 0 (0: dropless)",
        )
        choice(f"{prefix}.second_policy", self.second_policy, ("all", "sampling", "random"))
        finite_nonneg(prefix, self, ("aux_weight", "z_loss_weight", "bias_rate"))


TOP1_WEIGHTS = ("prob", "normalized", "straight_through")


def top1_weight(p_T1: torch.Tensor, how: str) -> torch.Tensor:
    """The chosen expert's combine weight from its probability (``TopKOptions.top1_weight``)."""
    if how == "normalized":
        return p_T1 / p_T1.detach().clamp_min(1e-20)
    if how == "straight_through":
        return 1.0 + p_T1 - p_T1.detach()
    return p_T1


def balance_options(o: TopKOptions) -> BalanceOptions:
    return BalanceOptions(o.balance, o.aux_weight, o.z_loss_weight, o.bias_rate)


@ROUTERS.register("topk")
class TopKRouter(Router):
    Options = TopKOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.cfg = self.opts
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)
        o = self.cfg
        # only when asked for: the plain Switch / GShard state dict stays that of earlier releases
        needed = o.bias_rate > 0 or o.balance in ("sequence", "global", "none")
        self.balancer = Balancer(spec.num_experts, balance_options(o), per_token=True) if needed else None

    def loss_weights(self) -> dict[str, float]:
        return {"balance": self.cfg.aux_weight, "z": self.cfg.z_loss_weight}

    def on_step(self, step: int) -> None:
        if self.balancer is not None:
            self.balancer.on_step()

    def export_routing(self, hard: bool) -> tuple[int, bool]:  # noqa: ARG002
        if self.cfg.bias_rate > 0:
            raise ValueError(
                f"router.topk.bias_rate = {self.cfg.bias_rate}: the aux-loss-free bias changes which "
                "experts are chosen: a Hugging Face MoE router (softmax top-k of a linear gate) cannot"
            )
        if self.cfg.capacity_factor > 0:
            raise ValueError(
                f"router.topk.capacity_factor = {self.cfg.capacity_factor} drops tokens past capacity, also "
                "at evaluation; the Hugging Face MoE classes never drop (train with capacity_factor = 0)"
            )
        # at evaluation every second_policy keeps the second best expert: a plain top-k; a top-1 weight of
        # value 1 is a renormalised top-1
        if self.cfg.k == 1:
            return 1, self.cfg.top1_weight != "prob"
        return self.cfg.k, self.cfg.renormalize

    def choose(self, z_TE: torch.Tensor, p_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[T, K] experts and which of them are kept before capacity (None: all of them)."""
        k = self.cfg.k
        if k == 2:
            first_T = p_TE.argmax(-1)
            second_T, keep2_T = second_choice(z_TE, p_TE, first_T, self.cfg.second_policy, self.training)
            expert_TK = torch.stack([first_T, second_T], 1)
            if keep2_T is None:
                return expert_TK, None
            return expert_TK, torch.stack([torch.ones_like(keep2_T), keep2_T], 1)
        return p_TE.topk(k, dim=-1).indices, None

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        z_TE = self.gate(x_TD)
        p_TE = torch.softmax(z_TE, dim=-1)
        T, E = p_TE.shape
        if self.balancer is not None and self.cfg.bias_rate > 0:  # the bias moves the choice, not the weights
            z_sel = self.balancer.selection_scores(z_TE.detach())
            expert_TK, keep_TK = self.choose(z_sel, torch.softmax(z_sel, dim=-1))
        else:
            expert_TK, keep_TK = self.choose(z_TE, p_TE)
        weight_TK = p_TE.gather(1, expert_TK)
        if self.cfg.k > 1 and self.cfg.renormalize:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-9)
        elif self.cfg.k == 1:
            weight_TK = top1_weight(weight_TK, self.cfg.top1_weight)
        if ctx.valid_T is not None:
            valid_TK = ctx.valid_T.unsqueeze(1).expand_as(expert_TK)
            keep_TK = valid_TK if keep_TK is None else keep_TK & valid_TK
        chosen_TK = keep_TK  # the choices the selection made (the bias's load), before capacity
        if self.cfg.capacity_factor > 0:
            keep_TK = torch.ones_like(expert_TK, dtype=torch.bool) if keep_TK is None else keep_TK
            wanted = keep_TK.sum()
            n_valid = T if ctx.valid_T is None else int(ctx.valid_T.sum())
            capacity = self.cfg.k * math.ceil(self.cfg.capacity_factor * n_valid / E)
            keep_TK = capacity_keep(expert_TK, keep_TK, E, capacity)
            dropped = wanted - keep_TK.sum()
        else:
            dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        # every token keeps its k choices: no mask, no host sync, and the dispatcher's fixed-k fold
        token_P, expert_P, weight_P = pairs_from_topk(expert_TK, weight_TK, keep_TK)
        first_TE = F.one_hot(expert_TK[:, 0], E)
        if self.balancer is None:
            aux = {
                "balance": load_balance_loss(p_TE, first_TE, ctx.valid_T),
                "z": router_z_loss(z_TE, ctx.valid_T),
            }
        else:  # the loss's f counts first choices (Switch/GShard), the bias's load every chosen pair
            load_TE = chosen_pairs(expert_TK, chosen_TK, E)
            aux = self.balancer.losses(p_TE, first_TE, z_TE, ctx.valid_T, ctx.shape, load_TE)
        fixed_k = self.cfg.k if keep_TK is None else None
        return Routing(
            token_P, expert_P, weight_P, aux=aux, probs_TE=p_TE.detach(), dropped=dropped, fixed_k=fixed_k
        )
