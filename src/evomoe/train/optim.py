"""AdamW with decoupled weight decay on matrices (not on norms, biases or the routers).

A router may ask for its own peak learning rate (``param_lr()`` > 0, e.g. BlockFFN's ``router_lr``): its
parameters then form a group whose ``lr_scale`` = router lr / ``train.lr`` follows the model's schedule.
``train.expert_lr_scale`` != 1 puts the routed experts of the spawned MoE layers in groups of their own with
that ``lr_scale``: each expert learns from about k/E of the batch, a smaller batch than the dense layers'.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig


def router_lr_groups(model: nn.Module, base_lr: float, seen: set) -> list[dict]:
    """One no-decay group per router that sets its own learning rate (parameters added to ``seen``)."""
    groups = []
    for module in model.modules():
        lr = getattr(module, "param_lr", lambda: 0.0)()
        if lr > 0:
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            groups.append({"params": params, "weight_decay": 0.0, "lr_scale": lr / base_lr})
    return groups


def routed_expert_params(model: nn.Module) -> set[int]:
    """ids of the routed experts' parameters of every spawned MoE layer."""
    return {
        id(p)
        for m in model.modules()
        if getattr(m, "spawned", False) and isinstance(getattr(m, "experts", None), nn.Module)
        for p in m.experts.parameters()
    }


def param_groups(
    model: nn.Module, weight_decay: float, base_lr: float = 1.0, expert_lr_scale: float = 1.0
) -> list[dict]:
    decay, no_decay, e_decay, e_no_decay, seen = [], [], [], [], set()
    routers = router_lr_groups(model, base_lr, seen)
    experts = routed_expert_params(model) if expert_lr_scale != 1.0 else set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_router = ".router." in f".{name}"
        is_bias = name.endswith(("bias", "b1_EH", "b2_ED"))  # experts' biases are [E, N]: rank 2
        decays = p.dim() >= 2 and not is_router and not is_bias
        if id(p) in experts:
            (e_decay if decays else e_no_decay).append(p)
        else:
            (decay if decays else no_decay).append(p)
    scaled = [
        {"params": ps, "weight_decay": wd, "lr_scale": expert_lr_scale}
        for ps, wd in ((e_decay, weight_decay), (e_no_decay, 0.0))
        if ps
    ]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *routers,
        *scaled,
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; ``train.optimizer_impl``: ``foreach`` (the reference: multi-tensor passes) or ``fused`` (one
    kernel per parameter group; equal to foreach up to rounding, tests/train/test_budget.py)."""
    impl = getattr(cfg, "optimizer_impl", "foreach")
    kind = {"fused": True} if impl == "fused" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, getattr(cfg, "expert_lr_scale", 1.0)),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        **kind,
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def rebuild_after_spawn(
    old: torch.optim.Optimizer, model: nn.Module, cfg: TrainConfig, mapping: dict, mode: str
) -> torch.optim.Optimizer:
    """A new optimizer over the spawned model. Parameters that survived keep their state; spawned
    experts start with fresh moments (``fresh``) or the base expert's moments copied to every expert
    (``copy``, with the base's step count); the new gates always start fresh.
    """
    new = build_optimizer(model, cfg)
    inverse = {new_p: old_p for old_p, new_p in mapping.items()}
    for group in new.param_groups:
        group["lr"] = old.param_groups[0]["lr"] * group.get("lr_scale", 1.0)
        for p in group["params"]:
            if p in inverse:
                src = old.state.get(inverse[p])
                if mode == "copy" and src:
                    new.state[p] = {
                        "step": src["step"].clone(),
                        "exp_avg": src["exp_avg"].expand_as(p).clone(),
                        "exp_avg_sq": src["exp_avg_sq"].expand_as(p).clone(),
                    }
            elif p in old.state:
                new.state[p] = old.state[p]
    return new
