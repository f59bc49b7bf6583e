"""What an export writes: the transformers class and config, the weights under transformers' names, and what
the user should know about it; ``ExportError`` when no class computes the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class ExportError(ValueError):
    """No transformers class computes this model; the message says why and what to do."""


@dataclass
class ExportPlan:
    model_type: str  # transformers' model_type: gpt2 | llama | qwen2 | mixtral | qwen2_moe | megatron-bert
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]  # transformers' in-memory names
    auto_class: str = "AutoModelForCausalLM"  # the transformers Auto class that loads it
    notes: list[str] = field(default_factory=list)  # printed by ``evomoe export`` (e.g. the position limit)
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json values (eos ids)
    special_tokens: dict[str, int] = field(default_factory=dict)  # tokenizer roles: bos_token -> id, ...
    bos_prefix: bool = False  # the tokenizer puts <s> before every text (the masked LM reads <s> + text)


def max_positions(plan: ExportPlan) -> int:
    return int(plan.config.get("max_position_embeddings") or plan.config.get("n_positions") or 0)
