"""Expert diversity in a metrics row (``moe.diversity``), read from the weights at log time."""

from __future__ import annotations

from ..moe.diversity import layer_diversity


def expert_diversity_row(model) -> dict:
    """``expert_diversity``: mean over the spawned MoE layers of the mean pairwise cosine distance of their
    experts' weights (None before the spawn); ``expert_diversity_layers``: one value per MoE layer."""
    layers = [layer_diversity(layer.experts) for layer in model.moe_layers() if layer.spawned]
    return {
        "expert_diversity": round(sum(layers) / len(layers), 6) if layers else None,
        "expert_diversity_layers": [round(x, 6) for x in layers],
    }
