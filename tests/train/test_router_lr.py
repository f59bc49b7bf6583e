"""A router's own learning rate (BlockFFN's router_lr) follows the model's schedule at its own scale."""

from __future__ import annotations

import torch
from torch import nn

from evomoe.config import TrainConfig
from evomoe.moe.router import RouterSpec
from evomoe.moe.routers.blockffn import BlockFFNOptions, BlockFFNRouter
from evomoe.train.optim import build_optimizer, set_lr


def test_router_lr_gets_its_own_group_and_scale():
    model = nn.Module()
    model.ffn = nn.Linear(4, 4)
    model.router = BlockFFNRouter(
        RouterSpec(d_model=4, num_experts=4, options=BlockFFNOptions(router_lr=0.01))
    )
    opt = build_optimizer(model, TrainConfig(lr=2e-3))
    router_ids = {id(p) for p in model.router.parameters()}
    groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} & router_ids]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == router_ids
    set_lr(opt, 1e-3)  # half the peak: the router's lr is half of its own peak
    assert abs(groups[0]["lr"] - 5e-3) < 1e-12
    assert all(g["lr"] == 1e-3 for g in opt.param_groups if g is not groups[0])
    plain = build_optimizer(model.ffn, TrainConfig(lr=2e-3))
    assert all("lr_scale" not in g for g in plain.param_groups)


def test_router_without_own_lr_stays_in_the_shared_groups():
    model = nn.Module()
    model.router = BlockFFNRouter(RouterSpec(d_model=4, num_experts=4))
    opt = build_optimizer(model, TrainConfig())
    assert len(opt.param_groups) == 2 and torch.is_tensor(opt.param_groups[1]["params"][0])
