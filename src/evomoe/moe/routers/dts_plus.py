"""DTS with two levers against the waste of its soft phase: a cap on experts per token and a
non-zero gate start. The paper's gate stays ``dts``; this one is ``dts_plus``.

- ``cap_start`` > 0: during the soft phase a token keeps at most k(progress) experts, the top-k of the
  tempered Gumbel softmax y, and of those only the ones above the threshold; k falls linearly from
  ``cap_start`` at the spawn to 1 when the temperature decay ends (``GateState.progress``: by steps, or by
  FLOPs with ``gate.clock = "flops"``). The soft phase then costs at most ``cap_start`` experts per token
  instead of up to E, and its cost shrinks as it goes.
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
Legend: T tokens, E experts, K the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config.errors import check
from ...registry import ROUTERS
from ..router import RouterContext, RouterSpec, Routing
from .dts import DTSOptions, DTSRouter


@dataclass
class DTSPlusOptions(DTSOptions):
    cap_start: int = 0  # experts per token allowed at the spawn, falling to 1; 0: no cap (the paper's DTS)
    gate_std: float = 0.0  # > 0: the gate starts N(0, gate_std); 0: router.gate_init
    normalize: bool = False  # weights / their detached sum over the selected experts (see the module doc)
    hard_noise: bool = True  # false: the hard phase trains on argmax(z), as evaluated (see the module doc)
    freeze_hard: bool = False  # true: the gate gets no gradient after the hard switch (see the module doc)

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        E = cfg.moe.num_experts
        check(0 <= self.cap_start <= E, f"{prefix}.cap_start", self.cap_start, f"must be in [0, E={E}]")
        check(0.0 <= self.gate_std < 1.0, f"{prefix}.gate_std", self.gate_std, "must be in [0, 1)")


def cap_at(cap_start: int, progress: float) -> int:
    """The cap after ``progress`` in [0, 1] of the decay: linear from ``cap_start`` down to 1."""
    return max(1, int(cap_start + (1 - cap_start) * min(max(progress, 0.0), 1.0) + 0.5))


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
        if self.cfg.gate_std > 0:
            nn.init.normal_(self.gate.weight, std=self.cfg.gate_std)

    def export_routing(self, hard: bool) -> tuple[int, bool]:
        k, _ = super().export_routing(hard)
        return k, self.cfg.normalize  # normalised top-1: weight 1

    def combine_weights(self, combine_TE: torch.Tensor, sel_TE: torch.Tensor) -> torch.Tensor:
        w_TE = combine_TE * sel_TE
        if not self.cfg.normalize:
            return w_TE
        return w_TE / w_TE.detach().sum(-1, keepdim=True).clamp_min(1e-20)

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        if self.cfg.freeze_hard and ctx.gate.hard:
            with torch.no_grad():
                return super().forward(x_TD, ctx)
        return super().forward(x_TD, ctx)

    def select(self, z_TE: torch.Tensor, ctx: RouterContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.gate.hard and not self.cfg.hard_noise:
            return F.one_hot(z_TE.argmax(-1), self.num_experts).bool(), torch.softmax(z_TE, -1)
        sel_TE, y_TE = super().select(z_TE, ctx)
        if self.cfg.cap_start and self.selects_as_in_training(ctx) and not ctx.gate.hard:
            k = cap_at(self.cfg.cap_start, ctx.gate.progress)
            if k < self.num_experts:
                sel_TE = sel_TE & top_k_mask(y_TE.detach(), k)
        return sel_TE, y_TE
