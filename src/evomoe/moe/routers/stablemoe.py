"""StableMoE (Dai et al. 2022): learn a routing, distil it into a tiny router, then freeze it (spec 5).

Affinity a[t, e] = x_t . c_e (centroids c_e as in BASE layers, float32). The pair's weight is always
sigmoid(a[t, e]) with gradient, so experts and centroids train in both stages; the block's residual
supplies the "+ x" of the spec's output.

Stage 1 (training, the first ``stage1_fraction`` of the steps after the spawn: ``stage_of``): greedy
top-1 on a. Aux losses (unscaled; weights
``router.stablemoe.balance_weight`` / ``distill_weight``):
- balance = (1/T) * sum_e ((|A_e| - n) / n) * sum_{t in A_e} sigmoid(a[t, e]), n = T / E, A_e the tokens
  sent to e and T the valid tokens. The spec's sum grows with the batch; dividing by T keeps its scale
  (and the meaning of the 0.3 weight) independent of the batch size. It pushes the sigmoid gate of
  over-loaded experts down and of under-loaded ones up.
- distill = cross-entropy of softmax(emb(id_t) . D^T) against argmax_e a[t, e] (a detached target), which
  trains only the distilled router: an embedding of the token id (V x embed_dim) and centroids D (E x dim).
Stage 2 (training) and evaluation (either stage): the expert is the greedy top-1 of the distilled router,
computed under no_grad, so its parameters get no gradient (grad None: AdamW leaves them unchanged, as
the repo's optimizer also exempts routers from weight decay). The aux losses are then zeros.
Padding (``ctx.valid_T`` False) is neither routed nor counted. Legend: T tokens, D width, E experts, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check, finite_nonneg
from ...registry import ROUTERS
from ..router import GateState, Router, RouterContext, RouterSpec, Routing, valid_tokens
from .base_layers import CentroidGate, sigmoid_pairs
from .hash import require_vocab_size


class DistilledRouter(nn.Module):
    """The lightweight router: logits[t, e] = emb(id_t) . D_e, from the token id alone."""

    def __init__(self, vocab_size: int, num_experts: int, embed_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.centroids = nn.Parameter(torch.empty(num_experts, embed_dim))
        nn.init.orthogonal_(self.centroids, gain=0.1)

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=ids_T.device.type, enabled=False):
            return self.embed(ids_T).float() @ self.centroids.float().t()


def stablemoe_balance_loss(a_PE: torch.Tensor, expert_P: torch.Tensor) -> torch.Tensor:
    """(1/T) sum_e ((|A_e| - n)/n) sum_{t in A_e} sigmoid(a[t, e]), n = T/E; the counts carry no gradient."""
    P, E = a_PE.shape
    if P == 0:
        return a_PE.sum() * 0.0
    n = P / E
    counts_E = torch.bincount(expert_P, minlength=E).to(a_PE.dtype)
    s_P = torch.sigmoid(a_PE.gather(1, expert_P.unsqueeze(1)).squeeze(1))
    return (((counts_E[expert_P] - n) / n) * s_P).sum() / P


def distill_loss(logits_PE: torch.Tensor, target_P: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the distilled router's logits against the (detached) greedy expert."""
    if logits_PE.shape[0] == 0:
        return logits_PE.sum() * 0.0
    return F.cross_entropy(logits_PE, target_P.detach())


@dataclass
class StableMoEOptions:
    stage1_fraction: float = 0.1  # share of the run's steps after the spawn spent in stage 1
    embed_dim: int = 50
    balance_weight: float = 0.3
    distill_weight: float = 0.3

    def validate(self, cfg, prefix: str) -> None:
        f = self.stage1_fraction
        check(0.0 < f < 1.0, f"{prefix}.stage1_fraction", f, "must be in (0, 1)")
        check(self.embed_dim >= 1, f"{prefix}.embed_dim", self.embed_dim, "must be >= 1")
        finite_nonneg(prefix, self, ("balance_weight", "distill_weight"))


def stage_of(gate: GateState, stage1_fraction: float) -> int:
    """1 for the first ``stage1_fraction`` of the steps from the spawn to the end of the run (at least one
    step), then 2. The plan (spawn, total steps) is fixed at the run's start and saved with it."""
    stage1 = max(1, int(round(stage1_fraction * (gate.total_steps - gate.spawn_step))))
    return 1 if gate.step < gate.spawn_step + stage1 else 2


@ROUTERS.register("stablemoe")
class StableMoERouter(Router):
    Options = StableMoEOptions
    needs = frozenset({"token_ids"})

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__(spec)
        self.cfg = self.opts
        self.centroids = CentroidGate(spec.d_model, spec.num_experts)
        V = require_vocab_size(spec, "stablemoe")
        self.distilled = DistilledRouter(V, spec.num_experts, self.cfg.embed_dim)

    def loss_weights(self) -> dict[str, float]:
        return {"balance": self.cfg.balance_weight, "distill": self.cfg.distill_weight}

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:
        if ctx.token_ids_T is None:
            raise ValueError("the stablemoe router needs the token ids: RouterContext.token_ids_T is None")
        logits_TE = self.centroids(x_TD)
        token_P = valid_tokens(ctx, x_TD.shape[0], x_TD.device)
        ids_P = ctx.token_ids_T.reshape(-1).index_select(0, token_P)
        if self.training and stage_of(ctx.gate, self.cfg.stage1_fraction) == 1:
            return self.learn_routing(logits_TE, token_P, ids_P)
        with torch.no_grad():
            probs_TE = torch.softmax(self.distilled(ctx.token_ids_T.reshape(-1)), -1)
        expert_P = probs_TE.index_select(0, token_P).argmax(-1)
        zero = logits_TE.new_zeros(())
        return self.routing(logits_TE, token_P, expert_P, probs_TE, {"balance": zero, "distill": zero})

    def learn_routing(self, logits_TE: torch.Tensor, token_P: torch.Tensor, ids_P: torch.Tensor) -> Routing:
        """Stage 1: greedy top-1 on the affinities, with the balance and distillation losses."""
        a_PE = logits_TE.index_select(0, token_P)
        expert_P = a_PE.detach().argmax(-1)
        aux = {
            "balance": stablemoe_balance_loss(a_PE, expert_P),
            "distill": distill_loss(self.distilled(ids_P), expert_P),
        }
        return self.routing(logits_TE, token_P, expert_P, torch.softmax(logits_TE.detach(), -1), aux)

    def routing(self, logits_TE, token_P, expert_P, probs_TE, aux) -> Routing:
        weight_P = sigmoid_pairs(logits_TE, token_P, expert_P)
        dropped = torch.zeros((), dtype=torch.long, device=logits_TE.device)
        return Routing(token_P, expert_P, weight_P, aux=aux, probs_TE=probs_TE, dropped=dropped)
