"""The small-MoE recipe's router options: the top-1 output scale of the top-k router."""

from __future__ import annotations

import pytest
import torch

from evomoe.config import router_config
from evomoe.moe.router import GateState, RouterContext
from evomoe.moe.routers.topk import TopKRouter


def topk(E: int, **opts) -> TopKRouter:
    """A router whose gate is the identity, so that the input rows are the logits (D = E)."""
    cfg = router_config()
    for k, v in opts.items():
        setattr(cfg.topk, k, v)
    r = TopKRouter.from_config(cfg, E, E)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    return r.train()


def weights_and_grad(how: str, z: torch.Tensor, upstream: torch.Tensor):
    z = z.clone().requires_grad_(True)
    routing = topk(z.shape[1], k=1, top1_weight=how)(z, RouterContext(gate=GateState()))
    (routing.weight_P * upstream).sum().backward()
    return routing.weight_P.detach(), z.grad


def test_top1_weight_values_and_gradients_against_their_definitions():
    torch.manual_seed(0)
    T, E = 6, 4
    z, up = torch.randn(T, E), torch.randn(T)
    first = z.argmax(-1)
    p_T = torch.softmax(z, -1)[torch.arange(T), first]

    w, g = weights_and_grad("prob", z, up)
    torch.testing.assert_close(w, p_T)  # Switch: the gate probability
    zr = z.clone().requires_grad_(True)
    (torch.softmax(zr, -1)[torch.arange(T), first] * up).sum().backward()
    torch.testing.assert_close(g, zr.grad)

    w, g = weights_and_grad("straight_through", z, up)
    torch.testing.assert_close(w, torch.ones(T))  # the expert's full output ...
    torch.testing.assert_close(g, zr.grad)  # ... and the gradient of p

    w, g = weights_and_grad("normalized", z, up)
    torch.testing.assert_close(w, torch.ones(T))
    zl = z.clone().requires_grad_(True)
    (torch.log_softmax(zl, -1)[torch.arange(T), first] * up).sum().backward()
    torch.testing.assert_close(g, zl.grad)  # the gradient of log p


def test_top1_weight_is_checked_and_exports_as_a_renormalised_top1():
    from evomoe.config import ConfigError, load_config  # noqa: PLC0415

    with pytest.raises(ConfigError, match=r"router\.topk\.top1_weight"):
        load_config("tiny", ["--router.name=topk", "--router.topk.top1_weight=ones"])
    assert topk(4, k=1).export_routing(True) == (1, False)
    assert topk(4, k=1, top1_weight="normalized").export_routing(True) == (1, True)
    assert topk(4, k=2).export_routing(True) == (2, True)
