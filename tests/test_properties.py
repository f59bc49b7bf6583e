"""Property tests that the module tests do not already cover (tests/moe/test_layer.py: fp32 dispatch with
random per-token expert counts; tests/test_schedule.py: the temperature schedule; tests/test_config.py:
TOML round trip of a few fields). Here: the dispatcher in float64 / float32 / bfloat16 with the extreme
routings (no expert, one hot expert, every expert); the learning-rate schedule and the phase plan;
every config field through TOML.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomoe.config import Config, to_dict, to_toml
from evomoe.moe.dispatcher import moe_reference
from evomoe.moe.experts import Experts
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import Router, RouterContext, RouterSpec, Routing
from evomoe.schedule import PHASES, LRSchedule, PhasePlan, build_schedules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops: on a shared 2-core machine one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


D, F = 16, 16  # 16-byte aligned rows in fp32 and bf16: the grouped kernel is eligible in both
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


class FixedRouter(Router):
    def __init__(self, routing: Routing, num_experts: int) -> None:
        super().__init__(RouterSpec(D, num_experts))
        self.routing = routing

    def forward(self, x_TD, ctx):
        return self.routing


def routing_pairs(T: int, E: int, mode: str, rng: torch.Generator) -> list[tuple[int, int]]:
    if mode == "none":
        return []
    if mode == "one hot expert":  # every token on the same expert
        e = int(torch.randint(E, (1,), generator=rng))
        return [(t, e) for t in range(T)]
    if mode == "all experts":
        return [(t, e) for t in range(T) for e in range(E)]
    pairs = []  # random: 0..E experts per token
    for t in range(T):
        k = int(torch.randint(E + 1, (1,), generator=rng))
        pairs += [(t, int(e)) for e in torch.randperm(E, generator=rng)[:k]]
    return pairs


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 20),
    E=st.integers(1, 6),
    mode=st.sampled_from(["random", "none", "one hot expert", "all experts"]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    impl=st.sampled_from(["auto", "grouped", "padded", "loop"]),
    activation=st.sampled_from(["gelu", "relu", "swiglu"]),
    seed=st.integers(0, 2**16),
)
def test_dispatcher_equals_reference_any_dtype(T, E, mode, dtype, impl, activation, seed):
    if impl == "grouped" and dtype == torch.float64:
        impl = "auto"  # no grouped kernel for float64: auto falls back to the loop
    g = torch.Generator().manual_seed(seed)
    pairs = routing_pairs(T, E, mode, g)
    perm = torch.randperm(len(pairs), generator=g).tolist()  # pairs in no particular order
    pairs = [pairs[i] for i in perm]
    token = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    expert = torch.tensor([e for _, e in pairs], dtype=torch.long)
    weight = torch.rand(len(pairs), generator=g)  # routers hand out float32 weights whatever the dtype

    layer = MoELayer(D, F, activation, impl)
    layer.experts = Experts(E, D, F, activation, impl)
    with torch.no_grad():
        layer.experts.w1_EDH.copy_(torch.randn(layer.experts.w1_EDH.shape, generator=g) * 0.3)
        layer.experts.w2_EFD.copy_(torch.randn(layer.experts.w2_EFD.shape, generator=g) * 0.3)
    layer.router = FixedRouter(Routing(token, expert, weight), E)
    x64 = torch.randn(T, D, generator=g, dtype=torch.float64)

    layer.to(dtype)
    x = x64.to(dtype).requires_grad_(True)
    out, _, stats = layer(x.view(1, T, D), RouterContext())
    out = out.view(T, D)
    assert out.dtype == dtype and int(stats.pairs) == len(pairs)
    if out.requires_grad:
        out.float().sum().backward()
    x_grad = x.grad if x.grad is not None else torch.zeros_like(x)  # no pair reads x: no gradient at all

    # the reference: one pair at a time, in float64, from the same (rounded) inputs and weights
    ref_layer = MoELayer(D, F, activation, "loop")
    ref_layer.experts = Experts(E, D, F, activation, "loop").to(torch.float64)
    with torch.no_grad():
        ref_layer.experts.w1_EDH.copy_(layer.experts.w1_EDH.double())
        ref_layer.experts.w2_EFD.copy_(layer.experts.w2_EFD.double())
    x_ref = x.detach().double().requires_grad_(True)
    ref = moe_reference(x_ref, Routing(token, expert, weight.double()), ref_layer.experts)
    if ref.requires_grad:
        ref.sum().backward()
    tol = TOL[dtype]
    scale = max(1.0, float(ref.detach().abs().max()))
    torch.testing.assert_close(out.double(), ref, atol=tol * scale, rtol=tol)
    grad_ref = x_ref.grad if x_ref.grad is not None else torch.zeros_like(x_ref)
    gscale = max(1.0, float(grad_ref.abs().max()))
    torch.testing.assert_close(x_grad.double(), grad_ref, atol=tol * gscale * 2, rtol=tol * 2)
    routed = {t for t, _ in pairs}
    for t in range(T):
        if t not in routed:  # no expert: exactly zero, and no gradient
            assert torch.equal(out[t], torch.zeros(D, dtype=dtype)) and not x_grad[t].any()


@settings(max_examples=80, deadline=None)
@given(
    lr=st.floats(1e-6, 1.0),
    warmup=st.integers(0, 200),
    extra=st.integers(0, 2000),
    min_ratio=st.floats(0.0, 1.0),
)
def test_lr_schedule_monotone_and_hits_endpoints(lr, warmup, extra, min_ratio):
    total = warmup + extra
    s = LRSchedule(lr, warmup, total, min_ratio)
    if warmup:
        assert s(0) == pytest.approx(lr / warmup) and s(warmup - 1) == pytest.approx(lr)
        up = [s(i) for i in range(warmup)]
        assert all(b >= a for a, b in zip(up, up[1:], strict=False))
    assert s(warmup) == pytest.approx(lr)
    assert s(max(total, warmup + 1)) == pytest.approx(lr * min_ratio, abs=1e-15)
    stride = max(1, extra // 97)
    down = [s(i) for i in range(warmup, total + 3, stride)] + [s(total + 10)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(down, down[1:], strict=False))
    assert all(lr * min_ratio * (1 - 1e-12) - 1e-18 <= v <= lr * (1 + 1e-12) for v in down)


@settings(max_examples=80, deadline=None)
@given(
    spawn=st.integers(0, 300),
    hard_after=st.integers(0, 300),
    dense_to_sparse=st.booleans(),
    moe=st.booleans(),
)
def test_phase_plan_is_monotone_and_switches_exactly_at_its_boundaries(
    spawn, hard_after, dense_to_sparse, moe
):
    p = PhasePlan(spawn, hard_after, dense_to_sparse, moe)
    steps = range(0, spawn + hard_after + 5)
    order = [PHASES.index(p.phase(s)) for s in steps]
    assert all(b >= a for a, b in zip(order, order[1:], strict=False))  # never goes back
    if not moe:
        assert set(order) == {0}
        return
    assert spawn == 0 or p.phase(spawn - 1) == "diversify"
    if dense_to_sparse and hard_after > 0:
        assert p.phase(spawn) == "sparsify" and p.phase(spawn + hard_after - 1) == "sparsify"
    assert p.phase(spawn + (hard_after if dense_to_sparse else 0)) == "sparse"


@settings(max_examples=40, deadline=None)
@given(
    steps=st.integers(2, 5000),
    data=st.data(),
    decay=st.sampled_from(["linear", "exponential", "cosine"]),
)
def test_built_schedules_count_the_gate_from_the_spawn(steps, data, decay):
    cfg = Config()
    cfg.train.steps = steps
    cfg.evolve.diversify_steps = data.draw(st.integers(0, steps - 1))
    cfg.gate.decay, cfg.gate.decay_steps = decay, data.draw(st.integers(1, 1000))
    cfg.gate.tau_max = data.draw(st.floats(0.1, 5.0))
    cfg.gate.tau_min = cfg.gate.tau_max * data.draw(st.floats(0.01, 1.0))
    s = build_schedules(cfg)
    spawn = cfg.evolve.diversify_steps
    assert s.tau(0) == pytest.approx(cfg.gate.tau_max) and s.tau(spawn) == pytest.approx(cfg.gate.tau_max)
    assert s.tau(spawn + cfg.gate.decay_steps) == pytest.approx(cfg.gate.tau_min)
    assert s.phases.phase(spawn) != "diversify"
    assert spawn == 0 or s.phases.phase(spawn - 1) == "diversify"


# ----------------------------------------------------------------------------------------------------
# every config field through TOML


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", type(v)


LEAVES = list(_leaves(Config()))
VALUE = {
    bool: st.booleans(),
    int: st.integers(-(2**63), 2**63 - 1),
    float: st.floats(allow_nan=False),  # inf and -inf included: TOML has them
    str: st.text(max_size=20),
}


def _set(cfg: Config, path: str, value) -> None:
    *parents, name = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, name, value)


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({path: VALUE[typ] for path, typ in LEAVES}))
def test_every_config_field_survives_toml(values):
    """Serialisation only (no validation): whatever a field holds, to_toml writes it back exactly."""
    cfg = Config()
    for path, value in values.items():
        _set(cfg, path, value)
    parsed = tomllib.loads(to_toml(cfg))
    assert parsed == to_dict(cfg)
    for path, typ in LEAVES:  # and with the same types (1.0 stays a float, True a bool)
        node = parsed
        for k in path.split("."):
            node = node[k]
        assert type(node) is typ, path
        if typ is float and math.isinf(node):
            assert node == values[path]
