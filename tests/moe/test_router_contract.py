"""The router contract: every registered router (``ROUTERS.names()``) passes these, so a router added in
one file is covered from the moment it is registered. With default options and a padded batch:

- valid pairs: indices in range, no (token, expert) pair twice, finite float weights, finite aux losses;
- padding is never routed;
- the gradient reaches the router's parameters (a router without parameters has none to reach);
- evaluation is deterministic (no RNG);
- its state survives a checkpoint round trip (safetensors, as the trainer writes it), also after
  ``on_step`` hooks changed it;
- (tests/parallel/test_ep_parallel.py) two expert-parallel ranks equal one process, for every router.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_model, save_model

from evomoe.config import router_config
from evomoe.moe.router import GateState, RouterContext
from evomoe.registry import ROUTERS

D, E, V, B, S = 16, 4, 50, 3, 8
T = B * S
# the phases a router may see: a soft dense-to-sparse step early in the run, and a hard one late
GATES = {
    "early": GateState(tau=2.0, hard=False, step=0, spawn_step=0, total_steps=100),
    "late": GateState(tau=0.5, hard=True, step=80, spawn_step=0, total_steps=100),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = ROUTERS.get(name)
    counts = torch.arange(V, 0, -1) if "token_counts" in cls.needs else None
    cfg = router_config(name=name, gate_init="normal")
    return cls.from_config(cfg, D, E, vocab_size=V, token_counts=counts, layer_idx=0, num_moe_layers=2)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g)
    ids_T = torch.randint(0, V, (T,), generator=g)
    valid_T = torch.ones(B, S, dtype=torch.bool)
    valid_T[0, -3:] = False  # right padding
    valid_T[2, :2] = False  # left padding
    return x_TD, ids_T, valid_T.reshape(-1)


def ctx(ids_T, valid_T, gate: str) -> RouterContext:
    return RouterContext(gate=GATES[gate], token_ids_T=ids_T, valid_T=valid_T, shape=(B, S))


NAMES = ROUTERS.names()


def test_the_contract_sees_every_router():
    assert {"dts", "topk", "soft", "base", "hash", "stablemoe"} <= set(NAMES)


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("name", NAMES)
def test_valid_pairs_finite_weights_and_padding_never_routed(name, gate):
    router = build(name).train()
    x_TD, ids_T, valid_T = batch()
    r = router(x_TD, ctx(ids_T, valid_T, gate))
    P = r.token_idx_P.numel()
    assert r.expert_idx_P.shape == (P,) and r.weight_P.shape == (P,)
    assert r.weight_P.is_floating_point() and torch.isfinite(r.weight_P).all()
    if P:
        assert 0 <= int(r.token_idx_P.min()) and int(r.token_idx_P.max()) < T
        assert 0 <= int(r.expert_idx_P.min()) and int(r.expert_idx_P.max()) < E
    pairs = set(zip(r.token_idx_P.tolist(), r.expert_idx_P.tolist()))
    assert len(pairs) == P, "a (token, expert) pair appears twice"
    assert valid_T[r.token_idx_P].all(), "a padding token was routed"
    for k, v in r.aux.items():
        assert torch.isfinite(v).all(), f"aux loss {k} is not finite"
    assert set(router.loss_weights()) <= set(r.aux), "a loss weight names no aux loss the router returns"


@pytest.mark.parametrize("name", NAMES)
def test_the_gradient_reaches_the_router(name):
    router = build(name).train()
    params = [p for p in router.parameters() if p.requires_grad]
    x_TD, ids_T, valid_T = batch()
    x_TD.requires_grad_(True)
    r = router(x_TD, ctx(ids_T, valid_T, "early"))
    g = torch.Generator().manual_seed(3)
    downstream_P = torch.randn(r.weight_P.shape, generator=g)  # what the experts' outputs would weigh
    loss = (r.weight_P * downstream_P).sum()
    weights = router.loss_weights()
    loss = loss + sum(weights.get(k, 0.0) * v for k, v in r.aux.items())
    if not params:  # e.g. hash: a fixed map, nothing to learn
        assert not r.weight_P.requires_grad
        return
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads), "no router parameter received a gradient"


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_is_deterministic(name):
    router = build(name).eval()
    x_TD, ids_T, valid_T = batch()
    with torch.no_grad():
        torch.manual_seed(10)
        a = router(x_TD, ctx(ids_T, valid_T, "early"))
        torch.manual_seed(11)
        b = router(x_TD, ctx(ids_T, valid_T, "early"))
    assert torch.equal(a.token_idx_P, b.token_idx_P) and torch.equal(a.expert_idx_P, b.expert_idx_P)
    assert torch.equal(a.weight_P, b.weight_P)


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_a_checkpoint_round_trip(name, tmp_path):
    router = build(name, seed=0).train()
    x_TD, ids_T, valid_T = batch()
    for step in range(3):  # let step hooks (bias updates, adaptive coefficients) change the state
        with torch.no_grad():
            router(x_TD, ctx(ids_T, valid_T, "early"))
        router.on_step(step)
    save_model(router, str(tmp_path / "router.safetensors"))
    restored = build(name, seed=1).train()  # other random init: everything must come from the file
    missing, unexpected = load_model(restored, str(tmp_path / "router.safetensors"), strict=True)
    assert not missing and not unexpected
    for mode in ("train", "eval"):
        getattr(router, mode)(), getattr(restored, mode)()
        with torch.no_grad():
            torch.manual_seed(5)
            a = router(x_TD, ctx(ids_T, valid_T, "late"))
            torch.manual_seed(5)
            b = restored(x_TD, ctx(ids_T, valid_T, "late"))
        assert torch.equal(a.token_idx_P, b.token_idx_P) and torch.equal(a.expert_idx_P, b.expert_idx_P)
        assert torch.equal(a.weight_P, b.weight_P), f"{mode}: weights differ after the round trip"
