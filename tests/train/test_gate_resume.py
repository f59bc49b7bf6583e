"""Exact resume with the gates that keep step state (permutation window and hardening, adaptive
coefficients, lambda, aux-loss-free bias): a run stopped between log lines and resumed logs the rows of an
uninterrupted one."""

from __future__ import annotations

import pytest
from test_resume import exact_view, run_rows, short_cfg

GATES = {
    "comet": {"router__comet__perm_steps": 5},  # hardens at step 4 + 5, after the stop at 6
    "blockffn": {"router__blockffn__stable_steps": 1, "router__blockffn__window_steps": 2},
    "remoe": {},
    "sigma": {"router__sigma__stages": "0:2; 3:1", "router__sigma__bias_rate": 0.01},
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_stop_and_resume_matches_uninterrupted(name, tmp_path, evomoe_cache):
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    cfg = lambda: short_cfg(router__name=name, train__log_every=4, **GATES[name])  # noqa: E731
    want = run_rows(cfg(), tmp_path / "ref", env)
    run_rows(cfg(), tmp_path / "cut", env, stop_after=6)
    got = run_rows(cfg(), tmp_path / "cut", env, resume=True)
    assert exact_view(got) == exact_view(want)
