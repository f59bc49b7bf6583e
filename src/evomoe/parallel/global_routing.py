"""Global-batch routing: every router decides on the whole global batch, as the single-process run does.

Each data-parallel rank holds a contiguous slice of the global batch. A forward pre-hook on the router
all-gathers the hidden states (and token ids, padding mask) of every rank, so the router runs unchanged on
the global batch; a forward hook keeps the pairs of this rank's tokens. Why:
- routing statistics are the ones the method defines over the training batch: balance losses (Switch
  f_e and P_e, DTS l_aux, StableMoE), capacity (top-k queues in global token order), BASE's balanced
  assignment and the routing entropy are those of the single-process run on the same global batch;
- the Gumbel noise of DTS (and GShard's sampling policy) is drawn for the global batch from the global
  RNG, whose state is identical on every rank, so every rank draws the numbers the single process draws.
Cost: an all-gather of T_global x D activations per MoE layer (its backward an all-reduce), and the router's
O(T_global * D * E) work done on every rank (small next to the experts' O(T * k * D * F)).
The hooks leave the router's module tree untouched (same parameter names, same checkpoints).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..moe.router import RouterContext, Routing
from .comm import CommStats, all_gather_rows, gather_sizes


class GlobalBatchRouting:
    """Pre/post forward hooks for one router; ``install`` registers them."""

    def __init__(self, group, stats: CommStats) -> None:
        self.group, self.stats = group, stats
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.offset = 0
        self.num_tokens = 0
        self.sizes: list[int] = []
        self.handles: list = []

    def install(self, router: torch.nn.Module) -> GlobalBatchRouting:
        self.handles = [router.register_forward_pre_hook(self.pre), router.register_forward_hook(self.post)]
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def pre(self, router: torch.nn.Module, args: tuple) -> tuple[torch.Tensor, RouterContext]:
        x_TD, ctx = args
        sizes = gather_sizes(x_TD.shape[0], self.group, x_TD.device)
        self.offset, self.num_tokens, self.sizes = sum(sizes[: self.rank]), x_TD.shape[0], sizes
        stats = self.stats if torch.is_grad_enabled() else None  # count training steps, not evaluation
        gather = lambda t: None if t is None else all_gather_rows(t, sizes, self.group, stats)  # noqa: E731
        shape = ctx.shape
        if shape is not None:
            shape = (sum(sizes) // shape[1], shape[1])
        global_ctx = dataclasses.replace(
            ctx, token_ids_T=gather(ctx.token_ids_T), valid_T=gather(ctx.valid_T), shape=shape
        )
        return gather(x_TD), global_ctx

    def post(self, router: torch.nn.Module, args: tuple, routing: Routing) -> Routing:
        lo, hi = self.offset, self.offset + self.num_tokens
        k = getattr(routing, "fixed_k", None)
        if k is not None and routing.token_idx_P.numel() == k * sum(self.sizes):
            keep_P = slice(lo * k, hi * k)  # token-major, k pairs per token: a slice, no host sync
        else:
            keep_P = (routing.token_idx_P >= lo) & (routing.token_idx_P < hi)
        dropped = routing.dropped
        if dropped is not None and self.rank != 0:
            dropped = torch.zeros_like(dropped)  # a global count: summed over ranks, it is counted once
        return dataclasses.replace(
            routing,
            token_idx_P=routing.token_idx_P[keep_P] - lo,
            expert_idx_P=routing.expert_idx_P[keep_P],
            weight_P=routing.weight_P[keep_P],
            probs_TE=None if routing.probs_TE is None else routing.probs_TE[lo:hi],
            dropped=dropped,
        )
