"""``Parallel``: expert parallelism + data parallelism for one torchrun job, applied from outside the model.

Layout for world size W and expert-parallel size ep (W % ep == 0):
- data: rank r holds rows [r*B/W, (r+1)*B/W) of the global batch of B sequences (``local_batch``);
- EP groups: consecutive ranks {g*ep, ..., g*ep+ep-1}; rank j of a group owns global experts
  [j*E/ep, (j+1)*E/ep) of every MoE layer (``EPDispatcher``);
- expert-DP groups: ranks {j, j+ep, j+2ep, ...}, the replicas of the same experts;
- dense parameters (embeddings, attention, norms, head, non-MoE FFNs) are replicated over all W ranks
  and averaged by DDP (or sharded with FSDP2 ``fully_shard``, ``parallel.dp_shard = "fsdp"``);
- experts and routers are left out of DDP/FSDP (the routers appear at the spawn step, after the wrapper is
  built) and reduced by ``sync_grads`` after the backward: routers and replicated experts averaged over
  all W ranks, sharded experts summed over their expert-DP group and divided by W (each rank's loss is the
  mean over its B/W rows, so the single-process gradient is (1/W) * the sum over all ranks' losses).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import Config, ConfigError
from ..evolve import fresh_experts, spawn_model
from . import checkpoint as pckpt
from .comm import CommStats, all_gather_rows
from .env import WorldInfo
from .ep_dispatcher import EPDispatcher
from .global_routing import GlobalBatchRouting

MANUAL = (".experts.", ".router.")  # parameter-name parts reduced by sync_grads, not by DDP / FSDP


def is_manual(name: str) -> bool:
    return any(part in f".{name}" for part in MANUAL)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


class Parallel:
    def __init__(
        self, cfg: Config, info: WorldInfo, device: torch.device, log: Callable[[str], None] = print
    ):
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: run through `evomoe` (cli) under torchrun"
            )
        self.cfg, self.device, self.log = cfg, device, log
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        ep = cfg.parallel.ep
        if self.world_size % ep:
            raise ConfigError(f"parallel.ep = {ep} must divide the number of processes ({self.world_size})")
        if cfg.train.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size = {cfg.train.batch_size} (the global batch) must be divisible by the "
                f"number of processes ({self.world_size})"
            )
        self.ep, self.ep_rank = ep, self.rank % ep
        self.ep_group = self._my_group([list(range(g, g + ep)) for g in range(0, self.world_size, ep)])
        self.expert_dp_group = self._my_group([list(range(j, self.world_size, ep)) for j in range(ep)])
        self.stats = CommStats()
        self.sharded: dict[int, nn.Parameter] = {}  # expert parameters holding a shard (E/ep experts), by id
        self.hooks: list[GlobalBatchRouting] = []
        self._stop: str | None = None
        self._foreach: list | None = None  # FSDP2: the optimizer's own foreach settings

    def _my_group(self, rank_lists: list[list[int]]):
        """Create every group (all ranks must, in the same order) and return the one holding this rank."""
        mine = None
        for ranks in rank_lists:
            group = dist.new_group(ranks) if len(ranks) < self.world_size else dist.group.WORLD
            if self.rank in ranks:
                mine = group
        return mine

    # ------------------------------------------------------------------------------------------ setup
    def main_first(self, fn: Callable):
        if not self.is_main:
            dist.barrier()
            return fn()
        try:
            return fn()
        finally:
            dist.barrier()

    def barrier(self) -> None:
        dist.barrier()

    def local_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for t in tensors:
            if t.shape[0] < self.world_size:
                raise ValueError(
                    f"a batch of {t.shape[0]} rows cannot be split over {self.world_size} processes"
                )
            out.append(torch.tensor_split(t, self.world_size)[self.rank].contiguous())
        return tuple(out)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP (or FSDP2) over the dense parameters; experts and routers are reduced by ``sync_grads``."""
        ignored = [n for n, _ in [*model.named_parameters(), *model.named_buffers()] if is_manual(n)]
        if self.cfg.parallel.dp_shard == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
            from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            skip = {p for n, p in model.named_parameters() if n in set(ignored)}
            fully_shard(model, mesh=mesh, ignored_params=skip)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
        ids = None
        if self.device.type == "cuda":  # "cuda" means the device cli selected from LOCAL_RANK
            ids = [torch.cuda.current_device() if self.device.index is None else self.device.index]
        # A fixed bucket layout, so that a resumed job reduces exactly as the uninterrupted one. By default
        # DDP puts every gradient in one bucket for its first step and then rebuilds the buckets once, in the
        # order gradients became ready in that step: a job restarted from a checkpoint would run one step
        # with the single bucket and then lay out buckets by the backward order of a later phase. With more
        # than 2 ranks the all-reduce's summation order depends on an element's offset in its bucket
        # (gloo's and NCCL's ring chunks), so the resumed losses drifted in the last bits. With
        # find_unused_parameters DDP never rebuilds: the buckets are fixed at construction, by the reversed
        # parameter order (the backward's order, roughly). Its cost: one walk of the autograd graph per
        # forward and one small all-reduce of the used-parameter map per step.
        return DDP(model, device_ids=ids, find_unused_parameters=True)

    # ------------------------------------------------------------------------------------------ evolve
    def _shard_layer(self, layer, layer_mapping: dict) -> dict:
        """Keep this rank's slice of a spawned layer's experts; install the EP dispatcher, routing hooks."""
        hook = GlobalBatchRouting(dist.group.WORLD, self.stats).install(layer.router)
        self.hooks.append(hook)
        if self.ep == 1:
            return layer_mapping
        ex = layer.experts
        num_global, n_local = ex.num_experts, ex.num_experts // self.ep
        lo = self.ep_rank * n_local
        swap = {}
        for name in ("w1_EDH", "w2_EFD"):
            full = getattr(ex, name)
            # a new Parameter, not a new Experts module: no init, so no RNG draw the single process lacks
            shard = nn.Parameter(full.detach()[lo : lo + n_local].clone())
            setattr(ex, name, shard)
            swap[full] = shard
            self.sharded[id(shard)] = shard
        ex.num_experts = n_local
        layer.dispatcher = EPDispatcher(num_global, self.ep_group, self.ep_rank, self.ep, self.stats)
        return {old: swap.get(new, new) for old, new in layer_mapping.items()}

    def spawn_model(
        self, model: nn.Module, cfg: Config, generator: torch.Generator, router_info: dict
    ) -> dict:
        """``evolve.spawn_model`` with each layer sharded right after its spawn: only one layer's full expert
        set exists at a time. Every rank draws the same numbers (same generator, same global RNG) as the
        single-process spawn, so each local expert equals that run's expert of the same global id."""
        return spawn_model(model, cfg, generator, after_layer=self._shard_layer, **router_info)

    def fresh_experts(
        self, model: nn.Module, cfg: Config, generator: torch.Generator, router_info: dict
    ) -> dict:
        return fresh_experts(model, cfg, generator, after_layer=self._shard_layer, **router_info)

    def prepare_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """FSDP2 leaves experts and routers plain tensors next to DTensors: foreach kernels reject the mix."""
        if self.cfg.parallel.dp_shard == "fsdp":
            self._foreach = [group.get("foreach") for group in opt.param_groups]  # what a checkpoint records
            for group in opt.param_groups:
                group["foreach"] = False
        return opt

    # ------------------------------------------------------------------------------------------ gradients
    def _manual_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for n, p in model.named_parameters() if p.requires_grad and is_manual(n)]

    def sync_grads(self, model: nn.Module) -> None:
        """Average experts' and routers' gradients as the single-process run would have them (see module doc).

        A gradient missing on every rank stays missing (as in one process); missing on some, it counts as 0.
        """
        params = self._manual_params(model)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(has)
        for p, h in zip(params, has.tolist(), strict=True):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        live = [p for p in params if p.grad is not None]
        for sharded in (False, True):
            group = self.expert_dp_group if sharded else dist.group.WORLD
            grads = [p.grad for p in live if (id(p) in self.sharded) == sharded]
            if not grads or (sharded and self.world_size == self.ep):
                for g in grads:
                    g.div_(self.world_size)
                continue
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            flat.div_(self.world_size)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(synced)

    def clip_grad_norm(self, model: nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global gradient norm: replicated gradients once, shards summed over their groups."""
        fsdp = any(_is_dtensor(p) for p in params)
        if self.ep == 1 and not fsdp:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)  # every gradient is replicated
        sq = {"replicated": 0.0, "ep": 0.0, "fsdp": 0.0}
        for p in params:
            g = p.grad
            kind = "fsdp" if _is_dtensor(g) else ("ep" if id(p) in self.sharded else "replicated")
            local = g.to_local() if kind == "fsdp" else g
            sq[kind] = sq[kind] + torch.linalg.vector_norm(local.float()) ** 2
        as_t = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(1)  # noqa: E731
        ep_sq, fsdp_sq = as_t(sq["ep"]).cpu(), as_t(sq["fsdp"]).cpu()
        if self.ep > 1:
            dist.all_reduce(ep_sq, group=self.ep_group)
        if fsdp:
            dist.all_reduce(fsdp_sq)
        total = (as_t(sq["replicated"]).cpu() + ep_sq + fsdp_sq).sqrt().squeeze(0)
        coef = min(max_norm / (float(total) + 1e-6), 1.0)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
        return total.to(self.device)

    # ------------------------------------------------------------------------------------------ agreement
    def reduce_step(self, finite: bool, flops: float, stop: str | None) -> tuple[bool, float]:
        """All ranks skip together, count the global FLOPs and agree whether to stop (see ``agreed_stop``)."""
        v = torch.tensor([0.0 if finite else 1.0, flops, 1.0 if stop else 0.0], dtype=torch.float64)
        dist.all_reduce(v)
        self._stop = stop or ("SIGTERM (on another rank)" if v[2] > 0 else None)
        return bool(v[0] == 0), float(v[1])

    def agreed_stop(self, stop: str | None) -> str | None:
        """The request agreed at the last ``reduce_step``; a later signal is agreed on at the next step."""
        return self._stop

    def sum_floats(self, values: list[float]) -> list[float]:
        v = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(v)
        return v.tolist()

    def reduce_interval(self, interval, spawned: bool) -> dict:
        """Turn this rank's interval statistics into the global ones (in place); return the comm fields.

        Means over equal-sized rank batches (loss, aux, entropy, grad norm) are averaged; counts (tokens,
        pairs, dropped, tokens per expert) summed; the max experts per token is a max. The all-to-all and
        gather counters are summed (bytes) and maxed (seconds) over ranks, per training step.
        """
        W, n = self.world_size, max(interval.steps, 1)
        aux_keys = sorted(interval.aux)
        s = self.stats
        means = [interval.loss, interval.grad_norm, *[interval.aux[k] for k in aux_keys]]
        sums = [interval.tokens, interval.pairs, interval.dropped, s.a2a_bytes, s.gather_bytes]
        maxes = [interval.max_k, s.a2a_seconds, s.gather_seconds]
        f64 = lambda vals: torch.stack([torch.as_tensor(v).detach().double().cpu().reshape(()) for v in vals])  # noqa: E731
        entropy_L = torch.as_tensor(interval.entropy).detach().double().cpu().reshape(-1)  # one per MoE layer
        v_sum, v_max = torch.cat([f64(means + sums), entropy_L]), f64(maxes)
        dist.all_reduce(v_sum)
        dist.all_reduce(v_max, op=dist.ReduceOp.MAX)
        v_sum[: len(means)] /= W
        interval.entropy = (v_sum[len(means) + len(sums) :] / W).float()
        out = v_sum.float().unbind(0)
        interval.loss, interval.grad_norm = out[0], out[1]
        interval.aux = {k: out[2 + i] for i, k in enumerate(aux_keys)}
        interval.tokens, interval.pairs, interval.dropped = out[len(means) : len(means) + 3]
        interval.max_k = v_max[0].float()
        if interval.counts is not None:
            interval.counts = self._global_counts(interval.counts, spawned and self.ep > 1)
        row = {
            "a2a_bytes_per_step": float(v_sum[len(means) + 3]) / n,
            "a2a_seconds_per_step": float(v_max[1]) / n,
            "router_gather_bytes_per_step": float(v_sum[len(means) + 4]) / n,
            "router_gather_seconds_per_step": float(v_max[2]) / n,
        }
        s.reset()
        return row

    def _global_counts(self, counts: list[torch.Tensor], sharded: bool) -> list[torch.Tensor]:
        """Tokens per expert per layer over all ranks; sharded layers hold only their experts' rows."""
        c_LE = torch.stack([c.detach().double() for c in counts])
        if not sharded:
            dist.all_reduce(c_LE)
            return list(c_LE.float().unbind(0))
        if self.world_size > self.ep:
            dist.all_reduce(c_LE, group=self.expert_dp_group)
        sizes = [c_LE.shape[1]] * self.ep
        full = all_gather_rows(
            c_LE.t().contiguous(), sizes, self.ep_group
        )  # [E, layers], global expert order
        return list(full.t().float().unbind(0))

    # ------------------------------------------------------------------------------------------ checkpoints
    def full_state_dict(self, model: nn.Module) -> dict:
        return pckpt.full_state_dict(model, self)

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        state = pckpt.full_optimizer_state(opt, self)
        if self._foreach is not None:  # the checkpoint keeps the optimizer's own settings, not FSDP's
            state["param_groups"] = [
                {**group, "foreach": flag}
                for group, flag in zip(state["param_groups"], self._foreach, strict=True)
            ]
        return state

    def load_weights(self, model: nn.Module, path, load: Callable | None = None) -> None:
        pckpt.load_weights(model, path, self)

    def shard_optimizer_state(self, state: dict, opt: torch.optim.Optimizer) -> dict:
        """``opt.load_state_dict`` also restores group settings: keep this layout's (FSDP: no foreach)."""
        sharded = pckpt.shard_optimizer_state(state, opt, self)
        if self._foreach is not None:
            sharded["param_groups"] = [{**group, "foreach": False} for group in sharded["param_groups"]]
        return sharded

    def align_rng(self, state: dict) -> None:
        """Rank 0 saved its own CUDA generator as device 0's state: every rank continues from it."""
        if "cuda" in state and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"][0], device=self.device)
