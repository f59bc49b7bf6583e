"""A learned leaf -> expert permutation (COMET+'s "local search"), usable by any gate.

Phi in R^{G x E x E} (G = 1, or one per tree). For the first ``steps`` optimizer steps it is relaxed:
P = Sinkhorn((Phi + noise * Gumbel) / tau_p) with log10 tau_p going linearly from ``log10_tau_start`` to
``log10_tau_end`` and the Sinkhorn iterations from ``iters_start`` to ``iters_end``; an entropy term
zeta * [H(P) + H(row-normalised P)] is returned as ``perm_entropy``. After the window the relaxed P is
hardened with the Hungarian algorithm and frozen (Phi is no longer used, so it gets no gradient).
Evaluation always uses the hard permutation (of the current Phi while the window is open).
The step counter, the hardened flag and the permutation are persistent buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops.sinkhorn import harden_permutation, permutation_matrix, sinkhorn
from .gate import gumbel_like


class LearnedPermutation(nn.Module):
    def __init__(self, groups: int, num_experts: int, opts) -> None:
        super().__init__()
        self.opts = opts
        self.phi_GEE = nn.Parameter(torch.empty(groups, num_experts, num_experts).uniform_(-0.05, 0.05))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))
        self.register_buffer("perm_GE", torch.arange(num_experts).repeat(groups, 1))

    def progress(self) -> float:
        return min(float(self.steps) / max(self.opts.perm_steps, 1), 1.0)

    def soft(self) -> torch.Tensor:
        o, u = self.opts, self.progress()
        log_tau = o.log10_tau_start + (o.log10_tau_end - o.log10_tau_start) * u
        iters = round(o.iters_start + (o.iters_end - o.iters_start) * u)
        logits = self.phi_GEE.float()
        if o.perm_noise > 0 and self.training:
            logits = logits + o.perm_noise * gumbel_like(logits)
        return sinkhorn(logits / 10.0**log_tau, iters)

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[G, E, E] permutation (soft while learning in training) and its entropy term (or None)."""
        if bool(self.hardened) or self.opts.perm_steps == 0:
            return permutation_matrix(self.perm_GE), None
        if not self.training:
            return permutation_matrix(harden_permutation(self.soft())), None
        p = self.soft()
        rows = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        ent = -(p * torch.log(p + 1e-12)).sum() - (rows * torch.log(rows + 1e-12)).sum()
        return p, ent / p.shape[0]

    @torch.no_grad()
    def on_step(self) -> None:
        if bool(self.hardened) or self.opts.perm_steps == 0:
            return
        self.steps += 1
        if int(self.steps) >= self.opts.perm_steps:
            self.perm_GE.copy_(harden_permutation(self.soft()))
            self.hardened.fill_(True)
