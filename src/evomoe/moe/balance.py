"""Load balancing shared by the learned routers: balance losses, z-loss and aux-loss-free bias.

Every router's ``Options`` that inherits ``BalanceOptions`` gets the same four settings:
- ``balance``: which load-balancing loss is returned as aux ``balance``, E * sum_e f_e P_e with P the mean
  router probability and f the load fraction of the router's assignment (one definition per router, the
  same in every mode): by default the share of the assigned pairs per expert (sums to 1); routers that
  build their ``Balancer`` with ``per_token=True`` (``topk``: the fraction of tokens whose first choice is
  e; ``dts``: the mean over tokens of the selection, the spec's l_aux, which sums to the experts per token)
  the mean over tokens. ``batch`` over the batch the router sees; ``sequence`` inside each sequence,
  averaged (DeepSeek-V3's complementary loss); ``global`` with f from the assignments of the whole step:
  those of the micro-batches already run in this step are added to the current batch's (the router already
  sees the global batch of all data-parallel ranks: the expert-parallel hooks gather it); ``none``.
- ``balance_weight`` and ``z_loss_weight`` (ST-MoE mean_t logsumexp(z_t)^2);
- ``bias_rate`` (gamma): aux-loss-free balancing (DeepSeek-V3). A per-expert bias b is added to the scores
  used for *selection* only (the combine weights never see it); after every optimizer step
  b_e += gamma * sign(mean_e load - load_e), load_e = the (token, expert) pairs that selected e during the
  step (every one of a token's k choices, before any capacity drop). 0 switches it off. The bias never
  changes the balance loss's definition or scale.
State: the bias and the step's load live in persistent buffers (a checkpoint written between steps
restores them exactly); the loss's step counts for ``global`` are zero between steps and not saved.
Legend: T tokens, E experts.
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
    """Holds the bias and the step's counts of one router.

    ``per_token``: f of the balance loss is the mean over tokens of the assignment instead of the share of
    pairs (see the module doc); the router's published definition decides, never the mode or the bias.
    """

    def __init__(self, num_experts: int, opts: BalanceOptions, per_token: bool = False) -> None:
        super().__init__()
        self.opts = opts
        self.per_token = per_token
        self.register_buffer("bias_E", torch.zeros(num_experts))
        self.register_buffer("step_counts_E", torch.zeros(num_experts))  # the bias's load: pairs per expert
        # the global loss's assignment counts and valid tokens of the step's earlier micro-batches
        self.register_buffer("step_assign_E", torch.zeros(num_experts), persistent=False)
        self.register_buffer("step_tokens", torch.zeros(()), persistent=False)

    def selection_scores(self, s_TE: torch.Tensor) -> torch.Tensor:
        """Scores to select with: ``s_TE`` plus the (gradient-free) bias when aux-loss-free is on."""
        if self.opts.bias_rate == 0.0:
            return s_TE
        return s_TE + self.bias_E.to(s_TE.dtype)

    def losses(
        self, prob_TE, assign_TE, z_TE, valid_T=None, shape=None, load_TE=None
    ) -> dict[str, torch.Tensor]:
        """Unscaled ``balance`` and ``z``; a training forward counts its assignments and load for the step.

        ``assign_TE``: what the balance loss's f counts; ``load_TE`` [T, E]: the pairs each expert got, the
        bias's load (default: ``assign_TE``; top-k's loss counts first choices, its load every choice).
        """
        kind, per_token = self.opts.balance, self.per_token
        if kind == "none":
            bal = prob_TE.sum() * 0.0
        elif kind == "sequence":
            seq = sequence_shape(shape, prob_TE.shape[0])
            bal = sequence_balance_loss(prob_TE, assign_TE, seq, valid_T, per_token)
        elif kind == "global":
            bal = balance_loss(prob_TE, assign_TE, valid_T, self.step_assign_E, per_token, self.step_tokens)
        else:
            bal = balance_loss(prob_TE, assign_TE, valid_T, per_token=per_token)
        if self.training and torch.is_grad_enabled():
            self._count(assign_TE, assign_TE if load_TE is None else load_TE, valid_T)
        out = {"balance": bal}
        if z_TE is not None:
            out["z"] = router_z_loss(z_TE, valid_T)
        return out

    @torch.no_grad()
    def _count(self, assign_TE: torch.Tensor, load_TE: torch.Tensor, valid_T) -> None:
        v_T1 = None if valid_T is None else valid_T.unsqueeze(1)
        a, load = assign_TE.float(), load_TE.float()
        self.step_assign_E += (a if v_T1 is None else a * v_T1).sum(0)
        self.step_counts_E += (load if v_T1 is None else load * v_T1).sum(0)
        self.step_tokens += a.shape[0] if valid_T is None else valid_T.sum()

    @torch.no_grad()
    def on_step(self) -> None:
        """After an optimizer step: move the bias against the step's load error, forget the counts."""
        if self.opts.bias_rate > 0.0:
            load_E = self.step_counts_E
            self.bias_E += self.opts.bias_rate * torch.sign(load_E.mean() - load_E)
        self.step_counts_E.zero_()
        self.step_assign_E.zero_()
        self.step_tokens.zero_()


def bias_update_reference(bias_E: list[float], load_E: list[float], rate: float) -> list[float]:
    """The bias rule written out per expert (tests)."""
    mean = sum(load_E) / len(load_E)
    return [b + rate * ((mean > x) - (mean < x)) for b, x in zip(bias_E, load_E)]
