"""Shared experts (always on, beside the routed ones) and expert width as a multiple of d_ff."""

from __future__ import annotations

import math

import pytest
import torch

from evomoe.config import Config, ConfigError, validate
from evomoe.evolve import fresh_layer, narrow_experts, spawn_layer
from evomoe.moe.experts import activate
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import GateState, RouterContext

D_MODEL, D_FF = 16, 32


def cfg_with(**moe) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.n_layers = D_MODEL, D_FF, 2
    cfg.moe.num_experts = 4
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    return cfg


def ffn(x, w1, w2, act):
    return activate(x @ w1, act) @ w2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fine_grained_experts_partition_the_dense_ffn(activation):
    torch.manual_seed(0)
    H = 2 * D_FF if activation == "swiglu" else D_FF
    w1, w2 = torch.randn(D_MODEL, H), torch.randn(D_FF, D_MODEL)
    E, width = 4, D_FF // 4
    n1, n2 = narrow_experts(w1.expand(E, -1, -1), w2.expand(E, -1, -1), width)
    assert n1.shape == (E, D_MODEL, H // 4) and n2.shape == (E, width, D_MODEL)
    x = torch.randn(5, D_MODEL)
    parts = sum(ffn(x, n1[e], n2[e], activation) for e in range(E))
    torch.testing.assert_close(parts, ffn(x, w1, w2, activation), rtol=1e-4, atol=1e-4)


def test_spawn_adds_shared_copies_of_the_dense_ffn_and_narrow_experts():
    cfg = cfg_with(shared_experts=1, expert_width=0.5)
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_FF, "gelu", "loop", 2)
    x = torch.randn(2, 6, D_MODEL)
    dense = layer.forward_dense(x.view(-1, D_MODEL))
    spawn_layer(layer, cfg, torch.Generator().manual_seed(0), layer_idx=0)
    assert layer.experts.d_ff == 16 and layer.shared.num_experts == 1
    torch.testing.assert_close(layer.forward_shared(x.view(-1, D_MODEL)), dense)
    out, routing, stats = layer(x, RouterContext(gate=GateState(tau=1.0), shape=(2, 6)))
    shared_off = layer.shared
    layer.shared = None
    torch.manual_seed(1)
    routed, _, _ = layer(x, RouterContext(gate=GateState(tau=1.0, hard=True), shape=(2, 6)))
    layer.shared = shared_off
    torch.manual_seed(1)
    both, _, stats = layer(x, RouterContext(gate=GateState(tau=1.0, hard=True), shape=(2, 6)))
    torch.testing.assert_close(both, routed + dense.view(2, 6, D_MODEL))
    # FLOPs rows in d_ff units: half-width routed pairs plus one full row per token for the shared expert
    assert math.isclose(float(stats.ffn_rows), float(stats.pairs) * 0.5 + 12)


def test_fresh_layer_with_defaults_has_no_shared_and_full_width():
    cfg = cfg_with()
    layer = MoELayer(D_MODEL, D_FF, "gelu", "loop", 2)
    fresh_layer(layer, cfg, torch.Generator().manual_seed(0), layer_idx=0)
    assert layer.shared is None and layer.experts.d_ff == D_FF
    _, _, stats = layer(torch.randn(1, 4, D_MODEL), RouterContext(gate=GateState(tau=1.0), shape=(1, 4)))
    assert stats.ffn_rows is None  # FLOPs counted from the pairs, as before


def test_config_checks_name_the_field():
    cfg = cfg_with(expert_width=2.0)
    with pytest.raises(ConfigError, match=r"moe\.expert_width = 2\.0"):
        validate(cfg)  # wider than the dense FFN it would be spawned from
    cfg.evolve.diversify_steps = 0
    validate(cfg)
    cfg.moe.shared_experts = -1
    with pytest.raises(ConfigError, match=r"moe\.shared_experts = -1"):
        validate(cfg)


def test_tiny_run_with_shared_and_fine_grained_experts(cli, tmp_path):
    out = tmp_path / "run"
    rc, _, err = cli(
        "train", "tiny", "--out", out, "--moe.shared_experts=1", "--moe.expert_width=0.5",
        "--moe.num_experts=8", "--train.steps=12", "--evolve.diversify_steps=4", "--gate.decay_steps=4",
        "--gate.hard_after=4", "--train.threads=1", "--train.eval_batches=1",
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    assert (out / "results.json").is_file()


def test_copied_moments_need_full_width_experts():
    """``evolve.opt_state = copy`` copies the dense FFN's Adam moments to every expert; narrow experts hold a
    subset of its units, so the moments do not fit: a config error naming the field, not a crash at spawn."""
    cfg = cfg_with(expert_width=0.5)
    cfg.evolve.opt_state = "copy"
    with pytest.raises(ConfigError, match=r"evolve\.opt_state.*moe\.expert_width = 0\.5"):
        validate(cfg)
    cfg.evolve.diversify_steps = 0  # nothing is spawned from a dense FFN: nothing to copy
    validate(cfg)
    cfg.evolve.diversify_steps, cfg.moe.expert_width = 100, 1.0
    validate(cfg)


def test_narrow_fresh_shared_expert_runs_on_every_token_and_counts_its_width():
    """``moe.shared_width = 0.5`` on fresh experts: the layer's output is the routed mixture plus the shared
    expert's FFN on every token (checked against a plain FFN of its weights), and the FLOPs rows count the
    shared expert at half a dense row per token."""
    cfg = cfg_with(shared_experts=1, shared_width=0.5, expert_width=0.25)
    cfg.evolve.diversify_steps = 0
    validate(cfg)
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_FF, "gelu", "loop", 2)
    fresh_layer(layer, cfg, torch.Generator().manual_seed(0), layer_idx=0)
    sh = layer.shared
    assert sh.d_ff == 16 and layer.experts.d_ff == 8
    x = torch.randn(2, 6, D_MODEL)
    ctx = RouterContext(gate=GateState(tau=1.0, hard=True), shape=(2, 6))
    torch.manual_seed(1)
    both, _, stats = layer(x, ctx)
    layer.shared = None
    torch.manual_seed(1)
    routed, _, _ = layer(x, ctx)
    expected = ffn(x.view(-1, D_MODEL), sh.w1_EDH[0], sh.w2_EFD[0], "gelu").view(2, 6, D_MODEL)
    torch.testing.assert_close(both, routed + expected)
    assert math.isclose(float(stats.ffn_rows), float(stats.pairs) * 0.25 + 12 * 0.5)


def test_shared_width_errors_name_the_field():
    cfg = cfg_with(shared_experts=1, shared_width=0.5)  # diversify_steps > 0: spawned copies of the FFN
    with pytest.raises(ConfigError, match=r"moe\.shared_width = 0\.5.*copies of the dense FFN"):
        validate(cfg)
    cfg.moe.shared_experts = 0  # no shared expert: the width is never used
    validate(cfg)
    cfg.moe.shared_experts, cfg.evolve.diversify_steps = 1, 0
    validate(cfg)
    for bad in (0.0, float("inf"), 0.001):
        cfg.moe.shared_width = bad
        with pytest.raises(ConfigError, match=r"moe\.shared_width"):
            validate(cfg)
