"""The task interface: what the trainer needs from a task, and nothing about which task it is.

A task owns its data (batches as a pure function of (seed, step), a fixed validation set), its loss, its
evaluation (the metric names it writes to ``eval.jsonl``), which models it can train (``model_kinds``,
and ``default_model`` for ``model.name = "auto"``), and what a batch costs outside the FFNs in FLOPs.
A task is one file: a ``Task`` subclass registered with ``@TASKS.register(name)``; an ``Options``
dataclass gives it a ``[task.<name>]`` config table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class Batch:
    """One batch: ``inputs`` are the model's keyword arguments, ``targets`` what the loss needs; every
    tensor has the sequences as rows (dim 0), so a batch splits over data-parallel ranks by rows."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0  # tokens of this batch (throughput and token counters)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            {k: fn(v) for k, v in self.inputs.items()},
            {k: fn(v) for k, v in self.targets.items()},
            self.num_tokens,
        )


@dataclass
class EvalContext:
    """What a task's ``evaluate`` may use. ``forward(batch)`` runs the model in evaluation mode on this
    rank's rows of a global batch (device, precision, routing statistics handled) and returns
    (output, local batch); ``sum_over_ranks`` adds floats over data-parallel ranks."""

    forward: Callable[[Batch], tuple[Any, Batch]]
    sum_over_ranks: Callable[[list[float]], list[float]]
    model: torch.nn.Module
    gate: Any
    device: torch.device
    step: int
    out_dir: Path | None = None  # where a task may write files next to eval.jsonl (main rank only)
    is_main: bool = True


class Task:
    Options: ClassVar[type | None] = None
    model_kinds: ClassVar[tuple[str, ...]] = ()  # the ``kind`` of the models it can train
    default_model: ClassVar[str] = ""  # the registered model ``model.name = "auto"`` means
    # every training batch has the same shape: ``train.compile`` compiles static graphs (else it runs eager)
    fixed_shapes: ClassVar[bool] = True
    metric_names: ClassVar[tuple[str, ...]] = ("val_loss",)
    # (metric, label, format) printed when a run ends
    headline: ClassVar[tuple[tuple[str, str, str], ...]] = (("val_loss", "validation loss", ".4f"),)

    def __init__(self, cfg: Any, env: Any, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.opts = getattr(cfg.task, cfg.task.name, None)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def train_batch(self, step: int) -> Batch:
        """The global training batch of ``step``: a pure function of (train.seed, step)."""
        raise NotImplementedError

    def val_batches(self) -> list[Batch]:
        raise NotImplementedError

    def loss(self, out: Any, batch: Batch) -> torch.Tensor:
        """The training loss (nats per target) of a model output on ``batch``; aux losses come on top."""
        raise NotImplementedError

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """The metrics named in ``metric_names`` over the validation set."""
        raise NotImplementedError

    def token_counts(self) -> torch.Tensor:
        """[V] training-set frequency of each token id (for routers that need it)."""
        raise NotImplementedError

    def forward_dense_flops(self, batch: Batch) -> float:
        """Forward FLOPs of the model outside its FFNs on ``batch`` (this rank's rows)."""
        raise NotImplementedError

    def passes(self, tokens: int) -> float | None:
        """Passes over the training split made by ``tokens`` (summed ``Batch.num_tokens``); None: unknown."""
        return None

    def provenance(self) -> dict[str, Any] | None:
        """What identifies the training text (corpus, package versions, content hash, tokenizer): the run
        directory keeps it, and resuming a run on other text is an error. None: nothing to check."""
        return None

    def summary(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{label} {metrics[k]:{fmt}}" for k, label, fmt in self.headline if k in metrics)
