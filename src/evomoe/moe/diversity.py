"""How different the experts of a layer are: the waste of a dense-to-sparse start made of copies.

Legend: E experts, N = every weight of one expert flattened (W1 and W2 together).
Diversity = mean pairwise cosine distance 1 - cos(w_i, w_j) over the E(E-1) ordered pairs of distinct
experts: 0 for exact copies (right after a ``copy`` spawn, where the soft phase computes E identical
experts per token), about 1 for independently initialised experts. Cheap: one [E, N] x [N, E] product,
computed at log time only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pairwise_cosine_distance(w_EN: torch.Tensor) -> torch.Tensor:
    """0-d float32: mean of 1 - cos(w_i, w_j) over pairs i != j (0 for fewer than 2 experts)."""
    E = w_EN.shape[0]
    if E < 2:
        return torch.zeros((), device=w_EN.device)
    u_EN = F.normalize(w_EN.float(), dim=1)
    cos_EE = u_EN @ u_EN.t()
    off_diagonal = cos_EE.sum() - cos_EE.diagonal().sum()
    return 1.0 - off_diagonal / (E * (E - 1))


def mean_pairwise_cosine_distance_reference(w_EN: torch.Tensor) -> torch.Tensor:
    """The slow twin: a Python loop over the ordered pairs."""
    E = w_EN.shape[0]
    if E < 2:
        return torch.zeros(())
    total = 0.0
    for i in range(E):
        for j in range(E):
            if i != j:
                total += 1.0 - float(F.cosine_similarity(w_EN[i].double(), w_EN[j].double(), dim=0))
    return torch.tensor(total / (E * (E - 1)))


def _local(w: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's local part (FSDP DTensor, expert-parallel shard): its experts on this rank."""
    return w.to_local() if hasattr(w, "to_local") else w


@torch.no_grad()
def expert_weights_EN(experts) -> torch.Tensor:
    """Every expert's weights as one row: [E, D*H + F*D] (this rank's experts under expert parallelism)."""
    w1, w2 = _local(experts.w1_EDH), _local(experts.w2_EFD)
    return torch.cat([w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)], dim=1)


@torch.no_grad()
def layer_diversity(experts) -> float:
    return float(mean_pairwise_cosine_distance(expert_weights_EN(experts)))
