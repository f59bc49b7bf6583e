"""The trainer's view of parallelism: ``make_parallel`` returns ``NoParallel`` for one process (every method
the plain single-device behaviour, no torch.distributed) or ``wrap.Parallel`` under torchrun.

Contract shared by both (the trainer calls exactly these):
- ``rank``, ``world_size``, ``is_main``; ``main_first(fn)``: rank 0 runs ``fn`` first (builds caches), then
  the others; ``barrier()``.
- ``local_batch(*tensors)``: this rank's contiguous slice of each global batch (rows).
- ``wrap(model)``: the module to call for training forwards (DDP/FSDP wrapper or the model itself).
- ``spawn_model`` / ``fresh_experts``: the evolve steps, sharding experts by global id as they appear.
- ``prepare_optimizer(opt)``: adapt a freshly built optimizer to the layout (FSDP2: no foreach kernels).
- ``sync_grads(model)``, ``clip_grad_norm(model, params, max_norm)``: after ``backward``.
- ``reduce_step(finite, flops, stop)``: agree on the step's skip decision, FLOPs and stop request;
  ``agreed_stop(stop)``: the stop request agreed at the last step (a signal may reach only one rank).
- ``reduce_interval(interval, spawned)``: metrics of all ranks into this interval; returns extra row fields.
- ``sum_floats(values)``: eval sums over ranks.
- ``full_state_dict`` / ``full_optimizer_state`` / ``load_weights`` / ``shard_optimizer_state``: checkpoints
  in the single-process layout (experts by global id).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError
from .env import world_info


class NullWriter:
    """A metrics writer that writes nothing (ranks other than 0)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class NoParallel:
    """One process: every method is the single-device behaviour."""

    rank, world_size, is_main = 0, 1, True

    def main_first(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def barrier(self) -> None:
        pass

    def local_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def spawn_model(
        self, model: nn.Module, cfg: Config, generator: torch.Generator, router_info: dict
    ) -> dict:
        from ..evolve import spawn_model  # noqa: PLC0415

        return spawn_model(model, cfg, generator, **router_info)

    def fresh_experts(
        self, model: nn.Module, cfg: Config, generator: torch.Generator, router_info: dict
    ) -> dict:
        from ..evolve import fresh_experts  # noqa: PLC0415

        return fresh_experts(model, cfg, generator, **router_info)

    def prepare_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return opt

    def sync_grads(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm(self, model: nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce_step(self, finite: bool, flops: float, stop: str | None) -> tuple[bool, float]:
        return finite, flops

    def agreed_stop(self, stop: str | None) -> str | None:
        return stop

    def reduce_interval(self, interval, spawned: bool) -> dict:
        return {}

    def sum_floats(self, values: list[float]) -> list[float]:
        return values

    def full_state_dict(self, model: nn.Module) -> dict | None:
        return None  # the checkpoint writer saves the model itself

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        return opt.state_dict()

    def load_weights(self, model: nn.Module, path, load: Callable) -> None:
        load(model, path)

    def shard_optimizer_state(self, state: dict, opt: torch.optim.Optimizer) -> dict:
        return state

    def align_rng(self, state: dict) -> None:
        pass


def make_parallel(
    cfg: Config, env: Mapping[str, str], device: torch.device, log: Callable[[str], None] = print
):
    """``NoParallel`` for one process, else the torchrun job's ``Parallel`` (process group set up by cli)."""
    info = world_info(env)
    if not info.distributed:
        if cfg.parallel.ep > 1:
            raise ConfigError(
                f"parallel.ep = {cfg.parallel.ep} needs {cfg.parallel.ep} processes: launch with "
                f"`torchrun --nproc_per_node {cfg.parallel.ep} -m evomoe train ...` (or set --parallel.ep=1)"
            )
        return NoParallel()
    from .wrap import Parallel  # noqa: PLC0415

    return Parallel(cfg, info, device, log)
