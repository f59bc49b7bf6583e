"""FLOP counting lives with the tasks (``evomoe.tasks.flops``); this module keeps the old import path."""

from __future__ import annotations

from ..tasks.flops import dense_token_flops, expert_pair_flops, step_flops, training_flops

__all__ = ["dense_token_flops", "expert_pair_flops", "step_flops", "training_flops"]
