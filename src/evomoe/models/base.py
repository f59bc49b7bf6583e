"""What every model returns and the one place that weights aux losses and collects routing statistics.

A model is a registered ``MoEModel``: it lists its MoE layers (``moe_layers``; every stack's, in a fixed
order), says whether they have spawned their experts, and returns a ``ModelOutput``. The task computes the
loss from the output; the trainer never looks inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe.layer import LayerStats, MoELayer
from ..moe.router import Routing


@dataclass
class ModelOutput:
    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unscaled, averaged over MoE layers
    aux_loss: torch.Tensor | None = None  # sum of aux * router coefficients (0 when there is none)
    stats: list[LayerStats] = field(default_factory=list)  # one per MoE layer, in ``moe_layers`` order
    ffn_rows: torch.Tensor | None = None  # FFN rows computed by every FFN (dense blocks too): FLOPs
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # model-specific (e.g. encoder memory)
    loss: torch.Tensor | None = None  # set by callers that compute a task's loss (``tasks.lm.lm_forward``)


class RoutingCollector:
    """Collects, over one forward, every FFN's statistics and every MoE layer's aux losses, weighted by
    the router's coefficients and averaged over the model's MoE layers (all stacks together)."""

    def __init__(self, num_moe_layers: int, like: torch.Tensor) -> None:
        self.n = max(num_moe_layers, 1)
        self.aux: dict[str, torch.Tensor] = {}
        self.aux_loss = like.new_zeros((), dtype=torch.float32)
        self.stats: list[LayerStats] = []
        self.ffn_rows: torch.Tensor | None = None

    def add(self, ffn: MoELayer, is_moe: bool, routing: Routing | None, stats: LayerStats) -> None:
        rows = stats.pairs if stats.ffn_rows is None else stats.ffn_rows
        self.ffn_rows = rows if self.ffn_rows is None else self.ffn_rows + rows
        if not is_moe:
            return
        self.stats.append(stats)
        if routing is None:  # not spawned yet: a dense FFN, no router
            return
        weights = ffn.router.loss_weights()
        for name, value in routing.aux.items():
            self.aux[name] = self.aux.get(name, 0.0) + value.float() / self.n
            if weights.get(name, 0.0):
                self.aux_loss = self.aux_loss + weights[name] * value.float() / self.n

    def output(self, logits: torch.Tensor, **extra: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits, self.aux, self.aux_loss, self.stats, self.ffn_rows, extra)


class MoEModel(nn.Module):
    """Base of the registered models. ``kind`` names what tasks can pair it with (decoder, encoder, ...)."""

    kind: str = ""

    def __init__(self, cfg, moe) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg, self.moe_cfg = cfg, moe

    def moe_layers(self) -> list[MoELayer]:
        raise NotImplementedError

    @property
    def spawned(self) -> bool:
        return any(layer.spawned for layer in self.moe_layers())
