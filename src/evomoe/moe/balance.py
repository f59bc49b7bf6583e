"""Load balancing shared by the learned routers: balance losses, z-loss and aux-loss-free bias.

Every router's ``Options`` that inherits ``BalanceOptions`` gets the same four settings:
- ``balance``: which load-balancing loss is returned as aux ``balance`` (E * sum_e f_e P_e, f the share of
  pairs per expert, P the mean router probability):
  ``batch`` over the batch the router sees; ``sequence`` inside each sequence, averaged (DeepSeek-V3's
  complementary loss); ``global`` with f from the counts of the whole step: the pairs of the micro-batches
  already run in this step are added to the current batch's (the router already sees the global batch of
  all data-parallel ranks: the expert-parallel hooks gather it); ``none``.
- ``balance_weight`` and ``z_loss_weight`` (ST-MoE mean_t logsumexp(z_t)^2);
- ``bias_rate`` (gamma): aux-loss-free balancing (DeepSeek-V3). A per-expert bias b is added to the scores
  used for *selection* only (the combine weights never see it); after every optimizer step
  b_e += gamma * sign(mean_e load - load_e), load = pairs routed to e during the step. 0 switches it off.
State (the bias, the step's counts) lives in persistent buffers: a checkpoint written between steps
restores it exactly. Legend: T tokens, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import check, choice, finite_nonneg
from .losses import balance_loss, router_z_loss, sequence_balance_loss, sequence_shape

BALANCE_KINDS = ("none", "batch", "sequence", "global")


@dataclass
class BalanceOptions:
    balance: str = "batch"  # none | batch | sequence | global
    balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    bias_rate: float = 0.0  # aux-loss-free bias step gamma (DeepSeek-V3: 0.001); 0: off

    supports_bias = True  # a class attribute (not a field): routers whose selection is the weights say False
    supports_z = True  # False: the router has no logits over experts (trees, code selectors)

    def validate(self, cfg, prefix: str) -> None:
        choice(f"{prefix}.balance", self.balance, BALANCE_KINDS)
        finite_nonneg(prefix, self, ("balance_weight", "z_loss_weight", "bias_rate"))
        check(
            self.bias_rate == 0.0 or self.supports_bias,
            f"{prefix}.bias_rate",
            self.bias_rate,
            "this router selects by its weights themselves (no separate selection score): leave it at 0",
        )
        check(
            self.z_loss_weight == 0.0 or self.supports_z,
            f"{prefix}.z_loss_weight",
            self.z_loss_weight,
            "this router has no logits over the experts for a z-loss: leave it at 0",
        )


def experts_if_selected(cfg, prefix: str) -> float:
    """moe.num_experts when ``prefix`` (``router.<name>``) is the configured router, else no bound: every
    router's table is validated, but only the chosen one must fit the expert count."""
    return cfg.moe.num_experts if cfg.router.name == prefix.rsplit(".", 1)[-1] else math.inf


def balance_weights(opts: BalanceOptions) -> dict[str, float]:
    """The coefficients of the aux losses ``Balancer.losses`` returns for this router."""
    out = {"balance": opts.balance_weight}
    if opts.supports_z:
        out["z"] = opts.z_loss_weight
    return out


class Balancer(nn.Module):
    """Holds the bias and the step's pair counts of one router."""

    def __init__(self, num_experts: int, opts: BalanceOptions) -> None:
        super().__init__()
        self.opts = opts
        self.register_buffer("bias_E", torch.zeros(num_experts))
        self.register_buffer("step_counts_E", torch.zeros(num_experts))

    def selection_scores(self, s_TE: torch.Tensor) -> torch.Tensor:
        """Scores to select with: ``s_TE`` plus the (gradient-free) bias when aux-loss-free is on."""
        if self.opts.bias_rate == 0.0:
            return s_TE
        return s_TE + self.bias_E.to(s_TE.dtype)

    def losses(self, prob_TE, assign_TE, z_TE, valid_T=None, shape=None) -> dict[str, torch.Tensor]:
        """Unscaled ``balance`` and ``z``; counts the pairs of a training forward for the step."""
        kind = self.opts.balance
        if kind == "none":
            bal = prob_TE.sum() * 0.0
        elif kind == "sequence":
            bal = sequence_balance_loss(prob_TE, assign_TE, sequence_shape(shape, prob_TE.shape[0]), valid_T)
        elif kind == "global":
            bal = balance_loss(prob_TE, assign_TE, valid_T, self.step_counts_E)
        else:
            bal = balance_loss(prob_TE, assign_TE, valid_T)
        if self.training and torch.is_grad_enabled():
            a = assign_TE.detach().float()
            a = a if valid_T is None else a * valid_T.unsqueeze(1)
            self.step_counts_E += a.sum(0)
        out = {"balance": bal}
        if z_TE is not None:
            out["z"] = router_z_loss(z_TE, valid_T)
        return out

    @torch.no_grad()
    def on_step(self) -> None:
        """After an optimizer step: move the bias against the step's load error, forget the counts."""
        if self.opts.bias_rate > 0.0:
            load_E = self.step_counts_E
            self.bias_E += self.opts.bias_rate * torch.sign(load_E.mean() - load_E)
        self.step_counts_E.zero_()


def bias_update_reference(bias_E: list[float], load_E: list[float], rate: float) -> list[float]:
    """The bias rule written out per expert (tests)."""
    mean = sum(load_E) / len(load_E)
    return [b + rate * ((mean > x) - (mean < x)) for b, x in zip(bias_E, load_E)]
