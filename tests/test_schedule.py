"""Schedules: learning rate, temperature counted from the spawn, phases, checkpointable state."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomoe.config import Config
from evomoe.schedule import (
    LRSchedule,
    PhasePlan,
    Schedules,
    TemperatureSchedule,
    build_schedules,
    decay_value,
)

KINDS = ("linear", "exponential", "cosine")


def test_lr_warmup_and_cosine_endpoints():
    s = LRSchedule(lr=1e-3, warmup=10, total=110, min_ratio=0.1)
    assert s(0) == pytest.approx(1e-4)
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)  # warmup reaches the peak on its last step
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(0.55e-3)  # cosine midpoint
    assert s(110) == pytest.approx(1e-4)
    assert s(500) == pytest.approx(1e-4)  # held at the floor
    values = [s(i) for i in range(10, 200)]
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:], strict=False))


def test_lr_without_warmup():
    s = LRSchedule(lr=2.0, warmup=0, total=100, min_ratio=0.0)
    assert s(0) == pytest.approx(2.0)
    assert s(100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_counted_from_spawn(kind):
    s = TemperatureSchedule(tau_max=2.0, tau_min=0.3, decay_steps=50, kind=kind, start_step=100)
    assert s(0) == pytest.approx(2.0)  # phase 1: held at tau_max, the clock has not started
    assert s(99) == pytest.approx(2.0)
    assert s(100) == pytest.approx(2.0)
    assert s(150) == pytest.approx(0.3)
    assert s(10_000) == pytest.approx(0.3)
    assert 0.3 < s(125) < 2.0


def test_temperature_shapes():
    lin = TemperatureSchedule(2.0, 0.5, 100, "linear", 0)
    exp = TemperatureSchedule(2.0, 0.5, 100, "exponential", 0)
    cos = TemperatureSchedule(2.0, 0.5, 100, "cosine", 0)
    assert lin(50) == pytest.approx(1.25)
    assert exp(50) == pytest.approx(1.0)  # geometric mean: tau_max * (tau_min / tau_max) ^ 0.5
    assert exp(25) == pytest.approx(2.0 * 0.25**0.25)
    assert cos(50) == pytest.approx(1.25)
    assert cos(25) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_decay_unknown_kind():
    with pytest.raises(ValueError, match="step"):
        decay_value(1.0, 0.5, 1, 10, "step")


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    tau_max=st.floats(0.05, 10.0),
    ratio=st.floats(0.01, 1.0),
    decay_steps=st.integers(1, 500),
    spawn=st.integers(0, 300),
)
def test_temperature_monotone_and_hits_endpoints(kind, tau_max, ratio, decay_steps, spawn):
    tau_min = tau_max * ratio
    s = TemperatureSchedule(tau_max, tau_min, decay_steps, kind, spawn)
    assert s(spawn) == pytest.approx(tau_max, rel=1e-9)
    assert s(spawn + decay_steps) == pytest.approx(tau_min, rel=1e-9)
    steps = range(max(spawn - 3, 0), spawn + decay_steps + 4, max(1, decay_steps // 50))
    values = [s(i) for i in steps]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:], strict=False))
    assert all(tau_min * (1 - 1e-12) <= v <= tau_max * (1 + 1e-12) for v in values)


def test_phase_plan_dts():
    p = PhasePlan(spawn_step=10, hard_after=5, dense_to_sparse=True)
    assert [p.phase(s) for s in (0, 9, 10, 14, 15, 100)] == [
        "diversify",
        "diversify",
        "sparsify",
        "sparsify",
        "sparse",
        "sparse",
    ]


def test_phase_plan_other_routers_and_dense():
    p = PhasePlan(spawn_step=10, hard_after=5, dense_to_sparse=False)
    assert [p.phase(s) for s in (9, 10, 12)] == ["diversify", "sparse", "sparse"]
    dense = PhasePlan(spawn_step=10, hard_after=5, dense_to_sparse=True, moe=False)
    assert {dense.phase(s) for s in range(0, 50)} == {"diversify"}
    start_sparse = PhasePlan(spawn_step=0, hard_after=0, dense_to_sparse=True)
    assert start_sparse.phase(0) == "sparse"


def test_build_schedules_from_config():
    cfg = Config()
    cfg.train.steps, cfg.evolve.diversify_steps = 1000, 100
    cfg.gate.tau_max, cfg.gate.tau_min, cfg.gate.decay_steps, cfg.gate.hard_after = 2.0, 0.5, 200, 300
    s = build_schedules(cfg)
    assert s.tau(100) == pytest.approx(2.0) and s.tau(300) == pytest.approx(0.5)
    assert s.phases.phase(99) == "diversify" and s.phases.phase(100) == "sparsify"
    assert s.phases.phase(399) == "sparsify" and s.phases.phase(400) == "sparse"
    assert s.lr(cfg.train.warmup_steps) == pytest.approx(cfg.train.lr)
    assert s.total_steps == 1000 and s.phases.spawn_step == 100  # the plan routers derive stages from
    cfg.router.name = "topk"
    assert build_schedules(cfg).phases.phase(100) == "sparse"


def test_schedules_state_dict_round_trip():
    cfg = Config()
    cfg.gate.decay = "exponential"
    s = build_schedules(cfg)
    d = json.loads(json.dumps(s.state_dict()))  # plain data: survives any checkpoint format
    r = Schedules.from_state_dict(d)
    assert r == s
    for step in (0, 99, 100, 350, 600, 700, 999):
        assert r.tau(step) == s.tau(step) and r.lr(step) == s.lr(step)
        assert r.phases.phase(step) == s.phases.phase(step)
