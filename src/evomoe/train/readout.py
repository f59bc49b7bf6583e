"""What the trainer reads from the device per log line (expert diversity, from the weights) and per step
(the finiteness flag and the FLOPs counts, in one host transfer)."""

from __future__ import annotations

import torch

from ..moe.diversity import layer_diversity


def expert_diversity_row(model) -> dict:
    """``expert_diversity``: mean over the spawned MoE layers of the mean pairwise cosine distance of their
    experts' weights (None before the spawn); ``expert_diversity_layers``: one value per MoE layer."""
    layers = [layer_diversity(layer.experts) for layer in model.moe_layers() if layer.spawned]
    return {
        "expert_diversity": round(sum(layers) / len(layers), 6) if layers else None,
        "expert_diversity_layers": [round(x, 6) for x in layers],
    }


def host_scalars(total_loss, grad_norm, out, spawned: bool, device) -> tuple[bool, float, float]:
    """(loss and gradient finite, FFN rows computed, tokens routed) with one host sync for the whole step
    (tests/train/test_budget.py: equal to reading each value alone, a sync per value)."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    rows = out.ffn_rows if out.ffn_rows is not None else zero
    routed = [s.tokens for s in out.stats] if spawned else []
    finite_t = torch.isfinite(total_loss).all() & torch.isfinite(grad_norm).all()
    parts = [finite_t, rows, *routed]
    host = torch.stack([p.to(device=device, dtype=torch.float64) for p in parts]).tolist()
    return bool(host[0]), host[1], sum(host[2:])
