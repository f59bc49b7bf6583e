"""The MoE feed-forward layer: route, dispatch, compute, combine.

Legend: B batch, S sequence, T = B*S tokens, D width, E experts, P routed (token, expert) pairs.
Before the EvoMoE spawn the layer holds one expert and no router: a plain dense FFN (phase 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.permute import count_per_bin
from .dispatcher import LocalDispatcher
from .experts import Experts, activate
from .losses import entropy_T
from .router import Router, RouterContext, Routing
from .stats import chunk_empty_slots, k_sums


@dataclass
class LayerStats:
    """Detached per-step routing statistics of one MoE layer (tensors: no host sync until logged)."""

    tokens: torch.Tensor  # valid tokens
    pairs: torch.Tensor  # (token, expert) pairs computed
    dropped: torch.Tensor  # pairs wanted but dropped (capacity)
    max_experts_per_token: torch.Tensor
    counts_E: torch.Tensor  # pairs per expert
    entropy: torch.Tensor  # mean routing entropy (nats); 0 for the dense phase
    k_sumsq: torch.Tensor | None = None  # sum over valid tokens of (experts per token)^2: the std of k
    chunk_empty: torch.Tensor | None = None  # (8-token chunk, expert) slots no token of the chunk used
    chunk_slots: torch.Tensor | None = None  # all (chunk, expert) slots: chunk-level sparsity = empty/slots
    ffn_rows: torch.Tensor | None = None  # FFN rows of width d_ff computed (FLOPs), when not ``pairs``


def routing_stats(
    routing: Routing, counts_E: torch.Tensor, num_tokens: int, valid_T=None, shape=None, num_experts=None
) -> LayerStats:
    """``shape``: (B, S) of the tokens (chunks stay inside sequences); ``num_experts``: global E."""
    tokens = torch.tensor(num_tokens) if valid_T is None else valid_T.sum()
    pairs = counts_E.sum()
    if routing.fixed_k is not None and num_tokens:
        max_k = torch.full((), routing.fixed_k, dtype=torch.long, device=counts_E.device)
        k_sumsq = tokens.double() * routing.fixed_k**2
    else:
        k_T = count_per_bin(routing.token_idx_P, num_tokens)
        max_k = k_T.max()
        k_sumsq = k_sums(k_T, valid_T)[1]
    empty, slots = chunk_empty_slots(
        routing.token_idx_P,
        routing.expert_idx_P,
        num_tokens,
        num_experts or counts_E.shape[0],
        shape,
        valid_T,
    )
    if routing.probs_TE is not None:
        ent_T = entropy_T(routing.probs_TE)
        entropy = ent_T.mean() if valid_T is None else (ent_T * valid_T).sum() / tokens.clamp_min(1)
    else:
        entropy = torch.zeros(())
    dropped = routing.dropped if routing.dropped is not None else torch.zeros((), dtype=torch.long)
    return LayerStats(
        tokens, pairs, dropped, max_k, counts_E.detach(), entropy.detach(), k_sumsq, empty, slots
    )


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str,
        impl: str = "auto",
        n_layers: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_ff, self.activation, self.impl, self.n_layers = (
            d_model,
            d_ff,
            activation,
            impl,
            n_layers,
        )
        self.experts = Experts(1, d_model, d_ff, activation, impl, n_layers, bias=bias)
        self.router: Router | None = None
        self.shared: Experts | None = None  # always-on experts beside the routed ones (set at the spawn)
        self.dispatcher = LocalDispatcher()

    @property
    def num_experts(self) -> int:
        """Global expert count (the dispatcher may hold only a shard of them locally)."""
        return getattr(self.dispatcher, "num_global_experts", None) or self.experts.num_experts

    @property
    def spawned(self) -> bool:
        return self.router is not None

    def forward(
        self, x_BSD: torch.Tensor, ctx: RouterContext
    ) -> tuple[torch.Tensor, Routing | None, LayerStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        if self.router is None:
            return self.forward_dense(x_TD).view(B, S, D), None, self.dense_stats(x_TD, ctx)
        return self.forward_routed(x_TD, ctx, B, S)

    # data-dependent shapes (rows per expert, experts per token) and host syncs: under ``train.compile`` the
    # routed path runs eagerly between the compiled regions (docs/performance.md, "Compiled training")
    @torch.compiler.disable
    def forward_routed(self, x_TD: torch.Tensor, ctx: RouterContext, B: int, S: int):
        D = x_TD.shape[1]
        routing = self.router(x_TD, ctx)
        x_PD, counts_E, state = self.dispatcher.dispatch(x_TD, routing, self.num_experts)
        y_PD = self.experts(x_PD, counts_E)
        out_TD = self.dispatcher.combine(y_PD, state)
        real_counts_E = getattr(state, "counts_E", None)  # the experts' counts may include padding rows
        stats = routing_stats(
            routing,
            counts_E if real_counts_E is None else real_counts_E,
            B * S,
            ctx.valid_T,
            (B, S),
            self.num_experts,
        )
        if self.shared is not None:
            out_TD = out_TD + self.forward_shared(x_TD)
        stats.ffn_rows = self.ffn_rows(stats)
        return out_TD.view(B, S, D), routing, stats

    def forward_shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Sum of the shared experts on every token (padding too: its output is never read)."""
        sh, T = self.shared, x_TD.shape[0]
        counts_E = torch.full((sh.num_experts,), T, dtype=torch.long, device=x_TD.device)
        y_PD = sh(x_TD.repeat(sh.num_experts, 1), counts_E)  # every token to every shared expert, in order
        return y_PD.view(sh.num_experts, T, -1).sum(0).to(x_TD.dtype)

    def ffn_rows(self, stats: LayerStats) -> torch.Tensor | None:
        """Computed rows in units of one d_ff-wide FFN on one token: routed pairs scaled by the expert width,
        plus every token's shared experts (None when that is just ``pairs``)."""
        shared = self.shared.num_experts * self.shared.d_ff / self.d_ff if self.shared is not None else 0
        if self.experts.d_ff == self.d_ff and not shared:
            return None
        return stats.pairs * (self.experts.d_ff / self.d_ff) + stats.tokens * shared

    def forward_dense(self, x_TD: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        w1, w2 = ex.w1_EDH[0].to(x_TD.dtype), ex.w2_EFD[0].to(x_TD.dtype)
        if not ex.bias:
            return activate(x_TD @ w1, self.activation) @ w2
        h_TH = torch.addmm(ex.b1_EH[0].to(x_TD.dtype), x_TD, w1)
        return torch.addmm(ex.b2_ED[0].to(x_TD.dtype), activate(h_TH, self.activation), w2)

    def dense_stats(self, x_TD: torch.Tensor, ctx: RouterContext) -> LayerStats:
        T = x_TD.shape[0]
        tokens = torch.tensor(T) if ctx.valid_T is None else ctx.valid_T.sum()
        one = torch.ones((), dtype=torch.long)
        return LayerStats(
            tokens, tokens.clone(), torch.zeros((), dtype=torch.long), one, tokens.view(1), torch.zeros(())
        )
