"""The trainer's parts outside the loop: the device, the task, the model class, its state records, its
error type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..config import Config
from ..registry import MODELS, TASKS
from ..tasks.base import Batch


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps); the message says why and what to do."""


def check_accumulation(batch_size: int, accum_steps: int, world_size: int) -> None:
    """Each process's rows of the step must split into ``accum_steps`` equal micro-batches."""
    rows = batch_size // world_size
    if accum_steps > 1 and (batch_size % world_size or rows % accum_steps):
        raise TrainingError(
            f"train.accum_steps = {accum_steps}: train.batch_size = {batch_size} over {world_size} processes "
            f"gives {batch_size / world_size:g} rows each, which must split into {accum_steps} equal "
            "micro-batches"
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device = 'cuda' but no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(name)


def build_task(cfg: Config, env: Mapping[str, str], log: Callable[[str], None], data=None):
    """The configured task; ``data`` (tests, benchmarks) replaces the corpus a task would load."""
    cls = TASKS.get(cfg.task.name)
    return cls(cfg, env, log, data=data) if data is not None else cls(cfg, env, log)


def model_class(cfg: Config) -> type:
    """The configured model; ``model.name = auto`` is the task's default model."""
    name = cfg.model.name
    return MODELS.get(TASKS.get(cfg.task.name).default_model if name == "auto" else name)


@dataclass
class Micro:
    """What a step keeps of one micro-batch's forward: losses, routing statistics, FLOPs rows, its rows."""

    loss: torch.Tensor
    aux_loss: torch.Tensor
    aux: dict
    stats: list
    ffn_rows: torch.Tensor | None
    batch: Batch


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    flops: float = 0.0  # cumulative training FLOPs executed
    tokens: int = 0
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    train_seconds: float = 0.0
