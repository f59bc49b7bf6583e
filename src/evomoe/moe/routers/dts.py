"""EvoMoE's Dense-To-Sparse gate (spec section 3).

Training: y = softmax((z + Gumbel) / tau); soft phase selects every expert with y > threshold (a variable
number per token), hard phase a sampled top-1 (argmax y). Combine weights are the clean softmax(z)
masked by the selection and not renormalised (option: the noisy tempered y). Evaluation: deterministic
top-1 of softmax(z), no noise, no dropping; or (``eval.router = "train"``, ``GateState.train_selection``)
the training selection at the current schedule values. Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import choice, finite_nonneg
from ...config.errors import check
from ...registry import ROUTERS
from ..balance import BALANCE_KINDS, BalanceOptions, Balancer
from ..losses import load_balance_loss
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask, pairs_from_topk
from .gate import LinearGate, gumbel_like


@dataclass
class DTSOptions:
    threshold: float = 0.001
    combine: str = "clean"  # clean: softmax(z) masked; noisy: the tempered noisy weights y masked
    balance_weight: float = 0.0
    gumbel: bool = True
    balance: str = "batch"  # none | batch | sequence | global: each with the reference l_aux's f (mean sel)
    bias_rate: float = 0.0  # aux-loss-free: a bias on the scores that select (combine = clean only); 0: off

    def validate(self, cfg, prefix: str) -> None:
        check(0.0 <= self.threshold < 1.0, f"{prefix}.threshold", self.threshold, "must be in [0, 1)")
        choice(f"{prefix}.combine", self.combine, ("clean", "noisy"))
        choice(f"{prefix}.balance", self.balance, BALANCE_KINDS)
        finite_nonneg(prefix, self, ("balance_weight", "bias_rate"))
        check(
            self.bias_rate == 0.0 or self.combine == "clean",
            f"{prefix}.bias_rate",
            self.bias_rate,
            "needs combine = 'clean' (the noisy weights would carry the bias)",
        )


@ROUTERS.register("dts")
class DTSRouter(Router):
    Options = DTSOptions
    dense_to_sparse = True
    default_gate_init = "zeros"  # a uniform start; the Gumbel noise breaks ties

    final_k = 1  # experts per token in the hard phase and at evaluation

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.cfg = self.opts
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)
        o = self.cfg
        needed = o.bias_rate > 0 or o.balance != "batch"  # else the state dict of earlier releases
        opts = BalanceOptions(o.balance, o.balance_weight, 0.0, o.bias_rate)
        self.balancer = Balancer(spec.num_experts, opts, per_token=True) if needed else None

    def loss_weights(self) -> dict[str, float]:
        return {"balance": self.cfg.balance_weight}

    def on_step(self, step: int) -> None:
        if self.balancer is not None:
            self.balancer.on_step()

    def export_routing(self, hard: bool) -> tuple[int, bool]:
        if self.cfg.bias_rate > 0:
            raise ValueError(
                f"router.dts.bias_rate = {self.cfg.bias_rate}: the aux-loss-free bias changes which "
                "experts are chosen: a Hugging Face MoE router (softmax top-k of a linear gate) cannot"
            )
        if not hard:
            raise ValueError(
                "a DTS gate in its soft phase trains with a variable number of experts per token (every "
                "expert above router.dts.threshold), which no top-k MoE class computes; export a checkpoint "
                "taken after the hard switch (gate.hard_after steps after the spawn)"
            )
        return 1, False  # argmax of softmax(z), weight = its probability (not renormalised)

    def select(self, z_TE: torch.Tensor, ctx: RouterContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Selection mask (no gradient) and the tempered weights y."""
        if not self.selects_as_in_training(ctx):
            return F.one_hot(z_TE.argmax(-1), self.num_experts).bool(), torch.softmax(z_TE, -1)
        noisy = z_TE + gumbel_like(z_TE) if self.cfg.gumbel else z_TE
        y_TE = torch.softmax(noisy / ctx.gate.tau, dim=-1)
        if ctx.gate.hard:
            sel_TE = F.one_hot(y_TE.argmax(-1), self.num_experts).bool()
        else:
            sel_TE = y_TE.detach() > self.cfg.threshold
        return sel_TE, y_TE

    def combine_weights(self, combine_TE: torch.Tensor, sel_TE: torch.Tensor) -> torch.Tensor:
        """The spec's weights: masked, not renormalised."""
        return combine_TE * sel_TE

    def balance_probs(self, p_TE: torch.Tensor, w_TE: torch.Tensor) -> torch.Tensor:
        """The probabilities of l_aux: the spec's combine weights w (masked by the selection)."""
        return w_TE

    def extra_aux(self, z_TE: torch.Tensor, ctx: RouterContext) -> dict[str, torch.Tensor]:
        """Auxiliary losses beside the balance loss (none in the paper's gate)."""
        return {}

    def selects_as_in_training(self, ctx: RouterContext) -> bool:
        return self.training or ctx.gate.train_selection

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        z_TE = self.gate(x_TD)
        p_TE = torch.softmax(z_TE, dim=-1)
        if self.balancer is not None and self.cfg.bias_rate > 0:
            sel_TE, y_TE = self.select(self.balancer.selection_scores(z_TE.detach()), ctx)
        else:
            sel_TE, y_TE = self.select(z_TE, ctx)
        if ctx.valid_T is not None:
            sel_TE = sel_TE & ctx.valid_T.unsqueeze(1)
        trains = self.selects_as_in_training(ctx)
        combine_TE = y_TE if (trains and self.cfg.combine == "noisy") else p_TE
        w_TE = self.combine_weights(combine_TE, sel_TE)
        fixed_k = None
        if (ctx.gate.hard or not trains) and ctx.valid_T is None:
            # exactly final_k experts per token: the same pairs without a nonzero (a host sync), fixed k
            k = self.final_k
            expert_TK = sel_TE.to(torch.uint8).topk(k, -1).indices.sort(-1).values
            token_P, expert_P, weight_P = pairs_from_topk(expert_TK, w_TE.gather(1, expert_TK))
            fixed_k = k
        else:
            token_P, expert_P, weight_P = pairs_from_mask(sel_TE, w_TE)
        b_TE = self.balance_probs(p_TE, w_TE)
        if self.balancer is None:
            aux = {"balance": load_balance_loss(b_TE, sel_TE, ctx.valid_T)}
        else:
            aux = {"balance": self.balancer.losses(b_TE, sel_TE, None, ctx.valid_T, ctx.shape)["balance"]}
        aux.update(self.extra_aux(z_TE, ctx))
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=p_TE.detach(), fixed_k=fixed_k)
