"""BlockFFN (Song et al. 2025): ReLU routing with RMS normalisation, locality and chunk losses (gates (d)).

s = W x (float32, no bias), A = ReLU(s), R = A / rms(A) * g (rms over experts, g a learned gain, ones).
Expert e runs for a token when R_e > 0 (any number, no top-k), with weight R_e. Same in training and eval.
Aux (unscaled), averaged over layers by the model:
- ``locality``: BCE-with-logits of alpha * s[prev(t)] against sigmoid(alpha * s[t]), prev(t) the previous
  token of the same sequence (pairs across sequence boundaries or with padding are left out), alpha 100;
- ``chunk``: mean over (chunk of ``chunk_len`` tokens, expert) of 1 - prod_t (1 - p[t, e]), p = A / sum A.
The chunk coefficient adapts (``AdaptiveCoefficient``) from the loss history; ``router_lr`` > 0 gives the
router parameters their own learning rate (the source trains them with a separate optimizer at 0.01).
Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import check, finite_nonneg
from ...registry import ROUTERS
from ..balance import BalanceOptions, Balancer, balance_weights
from ..losses import chunk_sparsity_loss, locality_loss, previous_token_index, sequence_shape
from ..router import Router, RouterContext, RouterSpec, Routing, pairs_from_mask
from .adaptive import AdaptiveCoefficient
from .gate import LinearGate


@dataclass
class BlockFFNOptions(BalanceOptions):
    locality_weight: float = 2e-3  # transfer_lambda (0.1B/0.5B/1.2B runs)
    sharpness: float = 100.0  # sigmoid_steep
    chunk_weight: float = 5e-2  # initial chunk-sparsification coefficient
    chunk_len: int = 64  # chunk_regularization_length; a shorter last chunk per sequence is allowed
    adaptive: bool = True
    stable_steps: int = 1000  # steps before the coefficient starts adapting
    window_steps: int = 100  # length of a loss window
    max_factor: float = 4.0  # cap of the coefficient, times its initial value
    min_ratio: float = 1.025  # a rising loss raises the coefficient by at least this factor
    router_lr: float = 0.0  # 0: the model's learning rate schedule; else the router's peak lr
    eps: float = 1e-6
    balance: str = "none"  # the released configs run without a load-balance loss
    balance_weight: float = 0.0

    supports_bias = False

    def validate(self, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        finite_nonneg(prefix, self, ("locality_weight", "sharpness", "chunk_weight", "router_lr"))
        for name in ("chunk_len", "window_steps"):
            check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        check(self.stable_steps >= 0, f"{prefix}.stable_steps", self.stable_steps, "must be >= 0")
        check(self.max_factor >= 1.0, f"{prefix}.max_factor", self.max_factor, "must be >= 1")
        check(self.min_ratio >= 1.0, f"{prefix}.min_ratio", self.min_ratio, "must be >= 1")
        check(self.eps > 0, f"{prefix}.eps", self.eps, "must be > 0")


@ROUTERS.register("blockffn")
class BlockFFNRouter(Router):
    Options = BlockFFNOptions

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        o = self.opts
        self.gate = LinearGate(spec.d_model, spec.num_experts, self.gate_init)
        self.gain = nn.Parameter(torch.ones(spec.num_experts))
        self.chunk_coef = AdaptiveCoefficient(o.chunk_weight, o)
        self.balancer = Balancer(spec.num_experts, o)

    def loss_weights(self) -> dict[str, float]:
        w = {"locality": self.opts.locality_weight, "chunk": self.chunk_coef.value()}
        return {**w, **balance_weights(self.opts)}

    def param_lr(self) -> float:
        """Peak learning rate of this router's parameters (0: the model's); read by the optimizer."""
        return self.opts.router_lr

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        o, v = self.opts, ctx.valid_T
        s_TE = self.gate(x_TD)
        a_TE = torch.relu(s_TE)
        rms_T1 = torch.sqrt(a_TE.pow(2).mean(-1, keepdim=True) + o.eps)
        r_TE = a_TE / rms_T1 * self.gain
        sel_TE = a_TE.detach() > 0
        if v is not None:
            sel_TE = sel_TE & v.unsqueeze(1)
        token_P, expert_P, weight_P = pairs_from_mask(sel_TE, r_TE)
        shape = sequence_shape(ctx.shape, x_TD.shape[0])
        p_TE = (a_TE / rms_T1) / (a_TE / rms_T1).sum(-1, keepdim=True).clamp_min(o.eps)
        chunk = chunk_sparsity_loss(p_TE, shape, o.chunk_len, v)
        if self.training and torch.is_grad_enabled():
            self.chunk_coef.observe(chunk.detach())
        aux = {
            "locality": locality_loss(s_TE, previous_token_index(shape, v, x_TD.device), o.sharpness),
            "chunk": chunk,
        }
        aux.update(self.balancer.losses(torch.softmax(s_TE, -1), sel_TE, s_TE, v, ctx.shape))
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=p_TE.detach())

    def on_step(self, step: int) -> None:
        self.chunk_coef.on_step()
        self.balancer.on_step()
