"""Run a function on several gloo processes on 127.0.0.1 (``torch.multiprocessing.spawn``).

The function runs as ``fn(rank, world_size, *args)`` with the default process group initialised; an
exception in any process fails the calling test with that process's traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun sets for a worker (the part evomoe reads)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    env = torchrun_env(rank, world_size, port)
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int = 2, *args) -> None:
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
