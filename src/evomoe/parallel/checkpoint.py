"""Checkpoints independent of the parallel layout: experts stored by global expert id.

Saving gathers every sharded expert tensor over its expert-parallel group (rank j's slice is global experts
[j*E/ep, (j+1)*E/ep)) and every FSDP-sharded tensor over the world, so the file has exactly the names and
shapes a single-process run writes. Loading reads, on every rank, only its own slice of each expert tensor
(``safe_open(...).get_slice``). Optimizer moments of expert parameters are gathered and sliced the same way.
A checkpoint written with ep=2 therefore resumes with ep=1 (or in one process) and vice versa.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .comm import all_gather_rows

WEIGHTS = "model.safetensors"


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _gather_experts(t: torch.Tensor, par) -> torch.Tensor:
    return all_gather_rows(t.detach().contiguous(), [t.shape[0]] * par.ep, par.ep_group)


def full_state_dict(model: nn.Module, par) -> dict[str, torch.Tensor]:
    """The single-process state dict, experts gathered by global id (collective on all ranks). Tied tensors
    (``lm_head.weight`` / ``tok_emb.weight``) stay one tensor under both names, as in ``model.state_dict()``,
    so the checkpoint writer drops the same duplicate a single-process save drops."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in done:
            if id(t) in par.sharded:
                done[id(t)] = _gather_experts(t, par)
            elif _is_dtensor(t):
                done[id(t)] = t.full_tensor()
            else:
                done[id(t)] = t.detach()
        out[name] = done[id(t)]
    return out


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Names of each state tensor, tied ones (``lm_head.weight`` / ``tok_emb.weight``) listed together."""
    by_id: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        by_id.setdefault(id(t), []).append(name)
    return {name: by_id[id(t)] for name, t in state.items()}


def load_weights(model: nn.Module, path: Path, par) -> None:
    """Load a layout-independent checkpoint: each rank reads its experts' slice and the dense tensors."""
    state = model.state_dict(keep_vars=True)
    aliases = _aliases(model)
    loaded: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(path) / WEIGHTS), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = []
        for name, t in state.items():
            src = next((a for a in aliases[name] if a in keys), None)
            if src is None:
                missing.append(name)
                continue
            if id(t) in par.sharded:
                view = f.get_slice(src)
                n_global, n_local = view.get_shape()[0], t.shape[0]
                if n_global != n_local * par.ep:
                    raise ValueError(f"{src} holds {n_global} experts, this run {n_local} x ep={par.ep}")
                lo = par.ep_rank * n_local
                value = view[lo : lo + n_local]
            else:
                value = f.get_tensor(src)
            if _is_dtensor(t):
                from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

                value = distribute_tensor(value.to(t.device), t.device_mesh, t.placements)
            loaded[name] = value
    used = {a for name in loaded for a in aliases[name]}
    unexpected = sorted(keys - used)
    if missing or unexpected:
        raise KeyError(f"missing: {sorted(missing)[:4]}, unexpected: {unexpected[:4]}")
    model.load_state_dict(loaded, strict=True)


def _opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _is_moment(v, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and v.dim() > 0 and v.shape[1:] == p.shape[1:]


def full_optimizer_state(opt: torch.optim.Optimizer, par) -> dict:
    """``opt.state_dict()`` with expert moments gathered by global id (collective on all ranks)."""
    sd = opt.state_dict()
    params = _opt_params(opt)
    state = {}
    for idx in sorted(sd["state"]):
        p, entry = params[idx], {}
        for k, v in sd["state"][idx].items():
            if id(p) in par.sharded and _is_moment(v, p):
                v = _gather_experts(v, par)
            elif _is_dtensor(v):
                v = v.full_tensor()
            entry[k] = v
        state[idx] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(saved: dict, opt: torch.optim.Optimizer, par) -> dict:
    """A full (single-process layout) optimizer state cut to this rank's experts / FSDP shards."""
    params = _opt_params(opt)
    state = {}
    for idx, entry in saved["state"].items():
        if idx >= len(params):
            raise KeyError(f"optimizer state for parameter {idx}, but the optimizer has {len(params)}")
        p, new = params[idx], {}
        for k, v in entry.items():
            if id(p) in par.sharded and _is_moment(v, p):
                if v.shape[0] != p.shape[0] * par.ep:
                    raise ValueError(
                        f"optimizer moment of {v.shape[0]} experts, this run {p.shape[0]} x ep={par.ep}"
                    )
                lo = par.ep_rank * p.shape[0]
                v = v[lo : lo + p.shape[0]].clone()
            elif _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape:
                from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            new[k] = v
        state[idx] = new
    return {"state": state, "param_groups": saved["param_groups"]}
