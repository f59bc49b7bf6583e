"""Rank and world size from the torchrun environment, and the process-group session.

The caller (``cli``, the only module that reads the environment) passes the environment as a mapping.
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (its agent's store) and
TORCHELASTIC_RESTART_COUNT for every worker; a plain ``python -m evomoe`` sets none of them and never
touches torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def world_info(env: Mapping[str, str]) -> WorldInfo:
    """This process's place in the job; a process started without torchrun is rank 0 of 1."""
    info = WorldInfo(_int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1), _int(env, "LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"RANK={info.rank} and WORLD_SIZE={info.world_size} are inconsistent")
    return info


def is_initialized() -> bool:
    import torch.distributed as dist  # noqa: PLC0415

    return dist.is_available() and dist.is_initialized()


def _store(env: Mapping[str, str], info: WorldInfo, timeout):
    """The rendezvous store, its keys prefixed by torchrun's restart count.

    Under torchrun every worker is a client of the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE), which
    outlives a restart: without a prefix, a restarted worker can read the address its dead predecessor
    published and connect to it (seen as "Connection refused" / "Connection reset by peer" at start-up).
    Without torchrun's agent store (MASTER_ADDR/MASTER_PORT set by hand), rank 0 hosts the store.
    """
    from torch.distributed import PrefixStore, TCPStore  # noqa: PLC0415

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not set: launch with torchrun")
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = TCPStore(
        env["MASTER_ADDR"],
        _int(env, "MASTER_PORT", 0),
        info.world_size,
        is_master=not agent and info.rank == 0,
        timeout=timeout,
    )
    return PrefixStore(f"evomoe/attempt_{_int(env, 'TORCHELASTIC_RESTART_COUNT', 0)}", store)


def init_process_group(env: Mapping[str, str], info: WorldInfo, timeout_s: float = 600.0) -> None:
    """gloo on CPU; NCCL for CUDA tensors (and gloo for CPU tensors) when a GPU is visible."""
    from datetime import timedelta  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = _store(env, info, timeout)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)


def destroy_process_group() -> None:
    if is_initialized():
        import torch.distributed as dist  # noqa: PLC0415

        dist.destroy_process_group()


@contextmanager
def distributed_session(env: Mapping[str, str]) -> Iterator[WorldInfo]:
    """Join the torchrun job for the body (nothing at all for a single process), then leave it."""
    info = world_info(env)
    if not info.distributed:
        yield info
        return
    init_process_group(env, info)
    try:
        yield info
    finally:
        destroy_process_group()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()


def broadcast_from_main(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object); identity without a process group."""
    if not is_initialized():
        return value
    import torch.distributed as dist  # noqa: PLC0415

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
