"""DTS with two levers against the waste of its soft phase: a cap on experts per token and a
non-zero gate start. The paper's gate stays ``dts``; this one is ``dts_plus``.

- ``cap_start`` > 0: during the soft phase a token keeps at most k(progress) experts, the top-k of the
  tempered Gumbel softmax y, and of those only the ones above the threshold; k falls linearly from
  ``cap_start`` at the spawn to ``cap_end`` (default 1) when the temperature decay ends
  (``GateState.progress``: by steps, or by FLOPs with ``gate.clock = "flops"``). The soft phase then
  costs at most ``cap_start`` experts per token instead of up to E, and its cost shrinks as it goes.
- ``gate_std`` > 0: the gate starts N(0, gate_std) instead of ``router.gate_init``: tokens prefer different
  experts from the first step, so copies of one expert receive different gradients (with copies the
  layer's output is unchanged by any gate while every expert is selected).
- ``normalize``: the combine weights are divided by their sum over the token's selected experts, taken
  without gradient: the output keeps its scale whatever the selection (copies keep the function under
  any cap, and the deterministic top-1 evaluation of freshly spawned copies is the dense FFN, weight 1),
  while the gate still gets the gradient of log p for each selected expert.
- ``hard_noise`` = false: after the hard switch training selects argmax(z), the expert evaluation uses,
  instead of argmax(z + Gumbel), which samples an expert from softmax(z) whatever the temperature (the
  argmax ignores it): with a flat gate the paper's hard phase trains on near-random experts while the
  evaluation routes by argmax.
- ``freeze_hard``: after the hard switch the gate is frozen: routed under no_grad, so the gate gets no
  gradient (AdamW leaves parameters without one unchanged) and the routing changes only as the hidden
  states feeding the gate do. StableMoE's argument: a routing that keeps moving wastes what the experts
  learned from the tokens they no longer receive.
- ``cap_end`` > 1: the gate goes from all experts to ``cap_end`` of them instead of one: the hard phase
  trains the top-``cap_end`` of z (with ``hard_noise``: of z + Gumbel, a sample without replacement from
  softmax(z)) and evaluation routes each token to the top-``cap_end`` of z. With ``normalize`` the
  weights then sum to 1 (a renormalised top-k); with fine-grained experts (``moe.expert_width`` < 1)
  this is an EvoMoE that ends in fine-grained top-k.
- ``distill_weight`` > 0: a token-level router (an embedding of the token id times centroids, StableMoE's
  distilled router) learns, from the spawn to the hard switch, to predict the gate's expert (cross-entropy
  against argmax z, detached; weight ``distill_weight``). From the hard switch on it selects (the top
  ``cap_end`` of its logits, without gradient: frozen) in training and at evaluation; the weights stay the
  gate's (normalised: 1). The routing after the switch is then a fixed map of the token, as Hash layers
  and StableMoE route, learned by the DTS phases instead of drawn at random.
- ``balance_on = "probs"``: l_aux on the full softmax p (Switch's and GShard's form, with the selection
  mask as the load) instead of the spec's masked weights w. With w, once a token selects fewer than all
  experts the loss falls as the selected experts' probabilities fall, whichever they are: it pushes every
  gate towards uniform (measured: a hard top-2 gate at entropy 2.73 of ln 16 = 2.77 nats after 500 steps,
  docs/crossover.md). With p the probability mass can only move between experts.
- ``normalize_grad``: the normalisation keeps its gradient (the renormalised top-k of the ``topk`` router):
  the gate learns which selected expert to weight more, and no longer gets the gradient of an output scale
  that the normalisation removes in the forward pass. Needs ``cap_end`` >= 2 (one expert: the weight is 1).
- ``z_loss_weight`` > 0: the router z-loss of ST-MoE, mean_t logsumexp(z_t)^2.
Legend: T tokens, E experts, K the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import check, choice, finite_nonneg
from ...registry import ROUTERS
from ..losses import router_z_loss
from ..router import RouterContext, RouterSpec, Routing
from .dts import DTSOptions, DTSRouter
from .gate import gumbel_like
from .hash import require_vocab_size
from .stablemoe import DistilledRouter, distill_loss


@dataclass
class DTSPlusOptions(DTSOptions):
    cap_start: int = 0  # experts per token allowed at the spawn, falling to 1; 0: no cap (the paper's DTS)
    gate_std: float = 0.0  # > 0: the gate starts N(0, gate_std); 0: router.gate_init
    normalize: bool = False  # weights / their detached sum over the selected experts (see the module doc)
    hard_noise: bool = True  # false: the hard phase trains on argmax(z), as evaluated (see the module doc)
    freeze_hard: bool = False  # true: the gate gets no gradient after the hard switch (see the module doc)
    cap_end: int = 1  # experts per token at the end of the decay, in the hard phase and at evaluation
    distill_weight: float = 0.0  # > 0: a token-id router distilled from the gate routes after the hard switch
    distill_dim: int = 50  # its embedding width
    balance_on: str = "weights"  # weights: the spec's l_aux on w; probs: on the full softmax p (module doc)
    normalize_grad: bool = False  # true: the normalising sum keeps its gradient (module doc; cap_end >= 2)
    z_loss_weight: float = 0.0  # the router z-loss (ST-MoE)

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        E = cfg.moe.num_experts
        check(0 <= self.cap_start <= E, f"{prefix}.cap_start", self.cap_start, f"must be in [0, E={E}]")
        check(1 <= self.cap_end <= E, f"{prefix}.cap_end", self.cap_end, f"must be in [1, E={E}]")
        finite_nonneg(prefix, self, ("distill_weight", "z_loss_weight"))
        choice(f"{prefix}.balance_on", self.balance_on, ("weights", "probs"))
        check(
            not self.normalize_grad or (self.normalize and self.cap_end >= 2),
            f"{prefix}.normalize_grad",
            self.normalize_grad,
            f"needs {prefix}.normalize = true and {prefix}.cap_end >= 2 (with one expert per token the "
            "normalised weight is the constant 1: the gate would get no gradient from the task)",
        )
        check(self.distill_dim >= 1, f"{prefix}.distill_dim", self.distill_dim, "must be >= 1")
        check(
            self.cap_start == 0 or self.cap_start >= self.cap_end,
            f"{prefix}.cap_end",
            self.cap_end,
            f"must be <= {prefix}.cap_start = {self.cap_start} (the cap falls from cap_start to cap_end)",
        )
        check(0.0 <= self.gate_std < 1.0, f"{prefix}.gate_std", self.gate_std, "must be in [0, 1)")


def cap_at(cap_start: int, progress: float, cap_end: int = 1) -> int:
    """The cap after ``progress`` in [0, 1] of the decay: linear from ``cap_start`` down to ``cap_end``."""
    return max(cap_end, int(cap_start + (cap_end - cap_start) * min(max(progress, 0.0), 1.0) + 0.5))


def top_k_mask(y_TE: torch.Tensor, k: int) -> torch.Tensor:
    """bool [T, E]: each token's k largest entries of y (ties: the lower expert index)."""
    idx_TK = y_TE.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # stable: ties as the reference
    return torch.zeros_like(y_TE, dtype=torch.bool).scatter_(1, idx_TK, True)


def top_k_mask_reference(y_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The slow twin: per token, a stable sort of the experts by decreasing y."""
    mask = torch.zeros_like(y_TE, dtype=torch.bool)
    for t in range(y_TE.shape[0]):
        order = sorted(range(y_TE.shape[1]), key=lambda e: (-float(y_TE[t, e]), e))
        mask[t, order[:k]] = True
    return mask


@ROUTERS.register("dts_plus")
class DTSPlusRouter(DTSRouter):
    Options = DTSPlusOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.final_k = self.cfg.cap_end
        self.distilled = None
        if self.cfg.distill_weight > 0:
            V = require_vocab_size(spec, "dts_plus with distill_weight > 0")
            self.distilled = DistilledRouter(V, spec.num_experts, self.cfg.distill_dim)
        if self.cfg.gate_std > 0:
            nn.init.normal_(self.gate.weight, std=self.cfg.gate_std)

    def loss_weights(self) -> dict[str, float]:
        weights = super().loss_weights()
        if self.cfg.z_loss_weight > 0:
            weights["z"] = self.cfg.z_loss_weight
        return weights if self.distilled is None else {**weights, "distill": self.cfg.distill_weight}

    def balance_probs(self, p_TE: torch.Tensor, w_TE: torch.Tensor) -> torch.Tensor:
        return p_TE if self.cfg.balance_on == "probs" else w_TE

    def extra_aux(self, z_TE: torch.Tensor, ctx: RouterContext) -> dict[str, torch.Tensor]:
        return {"z": router_z_loss(z_TE, ctx.valid_T)} if self.cfg.z_loss_weight > 0 else {}

    def export_routing(self, hard: bool) -> tuple[int, bool]:
        if self.distilled is not None:
            raise ValueError(
                f"router.dts_plus.distill_weight = {self.cfg.distill_weight}: after the hard switch the "
                "experts are chosen from the token id, which no Hugging Face MoE router computes"
            )
        super().export_routing(hard)  # its refusals
        return self.cfg.cap_end, self.cfg.normalize  # normalised: weights summing to 1 (top-1: weight 1)

    def combine_weights(self, combine_TE: torch.Tensor, sel_TE: torch.Tensor) -> torch.Tensor:
        w_TE = combine_TE * sel_TE
        if not self.cfg.normalize:
            return w_TE
        total_T1 = w_TE.sum(-1, keepdim=True)
        if not self.cfg.normalize_grad:
            total_T1 = total_T1.detach()
        return w_TE / total_T1.clamp_min(1e-20)

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        if self.cfg.freeze_hard and ctx.gate.hard:
            with torch.no_grad():
                routing = super().forward(x_TD, ctx)
        else:
            routing = super().forward(x_TD, ctx)
        if self.distilled is not None:
            routing.aux["distill"] = self.distill(x_TD, ctx)
        return routing

    def distill(self, x_TD: torch.Tensor, ctx: RouterContext) -> torch.Tensor:
        """The distillation loss: before the hard switch, in training, cross-entropy of the token-id
        router against the gate's argmax over the valid tokens; else 0."""
        if ctx.gate.hard or not self.training:
            return x_TD.new_zeros((), dtype=torch.float32)
        if ctx.token_ids_T is None:
            raise ValueError("router.dts_plus.distill_weight > 0 needs the token ids (ctx.token_ids_T)")
        ids_T = ctx.token_ids_T.reshape(-1)
        with torch.no_grad():
            target_T = self.gate(x_TD).argmax(-1)
        logits_TE = self.distilled(ids_T)
        if ctx.valid_T is not None:
            logits_TE, target_T = logits_TE[ctx.valid_T], target_T[ctx.valid_T]
        return distill_loss(logits_TE, target_T)

    def select(self, z_TE: torch.Tensor, ctx: RouterContext) -> tuple[torch.Tensor, torch.Tensor]:
        k_end, trains = self.cfg.cap_end, self.selects_as_in_training(ctx)
        if self.distilled is not None and ctx.gate.hard:  # the frozen token-id router selects
            with torch.no_grad():
                logits_TE = self.distilled(ctx.token_ids_T.reshape(-1))
            return top_k_mask(logits_TE, k_end), torch.softmax(z_TE, -1)
        if (ctx.gate.hard and not self.cfg.hard_noise) or (k_end > 1 and not trains):
            return top_k_mask(z_TE.detach(), k_end), torch.softmax(z_TE, -1)
        if ctx.gate.hard and k_end > 1:  # Gumbel top-k: k experts drawn from softmax(z) without replacement
            noisy = z_TE + gumbel_like(z_TE) if self.cfg.gumbel else z_TE
            return top_k_mask(noisy.detach(), k_end), torch.softmax(noisy / ctx.gate.tau, -1)
        sel_TE, y_TE = super().select(z_TE, ctx)
        if self.cfg.cap_start and trains and not ctx.gate.hard:
            k = cap_at(self.cfg.cap_start, ctx.gate.progress, k_end)
            if k < self.num_experts:
                sel_TE = sel_TE & top_k_mask(y_TE.detach(), k)
        return sel_TE, y_TE
