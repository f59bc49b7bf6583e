"""Hash layers (Roller et al. 2021): a fixed, unlearned map token id -> expert (spec 5).

Modes (``router.hash.mode``):
- ``random``: a seeded random map that gives every expert the same number of ids (up to one): a random
  permutation of the vocabulary dealt round-robin. Seeded by (``router.hash.seed``, layer index), so
  each MoE layer has its own map.
- ``balanced``: ids sorted by training-set frequency (most frequent first, ties by id), each given to the
  expert with the least summed frequency so far (ties: lowest expert). Ids never seen in training
  (count 0) would all land on one expert that way; they are dealt round-robin instead.
The map is a persistent buffer (saved in the state dict); routing is the same in training and
evaluation; each token goes to one expert with weight 1.0 (no gate, no parameters, no aux loss).
Legend: T tokens, V vocabulary, E experts, P pairs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ...config import choice
from ...registry import ROUTERS
from ..router import Router, RouterContext, RouterSpec, Routing, valid_tokens


def random_hash_map(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """[V] long: a seeded permutation of the ids dealt round-robin to the experts."""
    perm_V = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
    map_V = torch.empty(vocab_size, dtype=torch.long)
    map_V[perm_V] = torch.arange(vocab_size) % num_experts
    return map_V


def balanced_hash_map(token_counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[V] long: most frequent ids first, each to the currently least-loaded expert (load = summed count)."""
    counts = token_counts_V.detach().cpu().long().tolist()
    order = sorted(range(len(counts)), key=lambda v: -counts[v])  # stable: ties by id
    map_V = torch.empty(len(counts), dtype=torch.long)
    heap = [(0, e) for e in range(num_experts)]
    unseen = 0
    for v in order:
        c = counts[v]
        if c <= 0:
            map_V[v], unseen = unseen % num_experts, unseen + 1
            continue
        load, e = heapq.heappop(heap)
        map_V[v] = e
        heapq.heappush(heap, (load + c, e))
    return map_V


def hash_loads(map_V: torch.Tensor, token_counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] summed training frequency of the ids mapped to each expert."""
    return torch.zeros(num_experts, dtype=torch.long).index_add_(0, map_V.cpu(), token_counts_V.cpu().long())


def require_vocab_size(spec: RouterSpec, router: str) -> int:
    """The vocabulary size a token-id router needs: ``spec.vocab_size``, else the length of the counts."""
    if spec.vocab_size:
        return int(spec.vocab_size)
    if spec.token_counts is not None:
        return int(spec.token_counts.numel())
    raise ValueError(f"the {router} router needs the vocabulary size (RouterSpec.vocab_size)")


@dataclass
class HashOptions:
    mode: str = "balanced"  # balanced | random
    seed: int = 0

    def validate(self, cfg, prefix: str) -> None:
        choice(f"{prefix}.mode", self.mode, ("balanced", "random"))


@ROUTERS.register("hash")
class HashRouter(Router):
    Options = HashOptions
    needs = frozenset({"token_ids", "token_counts"})

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.mode = self.opts.mode
        V, E = require_vocab_size(spec, "hash"), spec.num_experts
        if self.mode == "random":
            map_V = random_hash_map(V, E, self.opts.seed * 1_000_003 + spec.layer_idx)
        elif self.mode == "balanced":
            map_V = balanced_hash_map(self._counts(spec.token_counts, V), E)
        else:
            raise ValueError(f"router.hash.mode = {self.mode!r}: choose from: balanced, random")
        self.register_buffer("expert_of_token", map_V, persistent=True)

    @staticmethod
    def _counts(token_counts: torch.Tensor | None, V: int) -> torch.Tensor:
        if token_counts is None:
            raise ValueError(
                "router.hash.mode = 'balanced' needs token_counts (training-set frequency of each token id); "
                "pass RouterSpec.token_counts, or use router.hash.mode=random"
            )
        counts = torch.as_tensor(token_counts).long().flatten()
        if counts.numel() > V:
            raise ValueError(f"token_counts has {counts.numel()} entries but the vocabulary has {V} ids")
        return torch.nn.functional.pad(counts, (0, V - counts.numel()))

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        if ctx.token_ids_T is None:
            raise ValueError("the hash router needs the token ids: RouterContext.token_ids_T is None")
        if ctx.token_ids_T.numel() != x_TD.shape[0]:
            raise ValueError(f"token_ids_T has {ctx.token_ids_T.numel()} ids for {x_TD.shape[0]} tokens")
        token_P = valid_tokens(ctx, x_TD.shape[0], x_TD.device)
        expert_P = self.expert_of_token[ctx.token_ids_T.reshape(-1)[token_P]]
        weight_P = torch.ones(token_P.numel(), dtype=torch.float32, device=x_TD.device)
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        return Routing(token_P, expert_P, weight_P, dropped=dropped)
