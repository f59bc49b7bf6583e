"""Equal-FLOPs budgets (issue 13): ``train.max_flops`` ends the run at the budget with the learning rate and
(``gate.clock = "flops"``) the gate planned over it, a resumed budget run is bitwise the uninterrupted one,
``evomoe compare --flops`` gives every method the same budget, and the fused AdamW equals the foreach one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from short_run import run_trainer, short_overrides

from evomoe.compare import equal_budgets, value_at
from evomoe.config import ConfigError, load_config
from evomoe.schedule import LRSchedule, PhasePlan, TemperatureSchedule, build_schedules
from evomoe.tasks.flops import step_flops
from evomoe.train.metrics import read_jsonl
from evomoe.train.trainer import Trainer

BUDGET = 3.2e9  # tiny at 12 steps: ~2.8e8 FLOPs per dense step, ~2x that with the capped soft phase
EXACT = ("step", "phase", "loss", "aux", "lr", "temperature", "hard", "experts_per_token", "flops", "entropy")


def budget_cfg(**over):
    args = short_overrides(eval_every=4, ckpt_every=100, log_every=1) + [
        "--train.steps=40",
        f"--train.max_flops={BUDGET}",
        "--gate.clock=flops",
        "--gate.decay_until=0.6",
        "--gate.hard_at=0.75",
        "--router.name=dts_plus",
        "--router.dts_plus.cap_start=3",
        "--evolve.spawn=split",
    ]
    return load_config("tiny", args + [f"--{k.replace('__', '.')}={v}" for k, v in over.items()])


def train(cfg, out: Path, env, stop_after: int | None = None, resume: bool = False) -> Trainer:
    return run_trainer(cfg, out, env, stop_after, resume)


def test_budget_run_stops_at_the_budget_and_resumes_bitwise(tmp_path, evomoe_cache):
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    ref = train(budget_cfg(), tmp_path / "ref", env)
    rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert rows[-1]["flops"] >= BUDGET > rows[-2]["flops"]  # the step that crossed the budget was the last
    assert ref.state.step == rows[-1]["step"] < 40  # train.steps is only a cap
    assert read_jsonl(tmp_path / "ref" / "eval.jsonl")[-1]["step"] == ref.state.step
    # the hard switch: the first step that starts with hard_at * budget FLOPs executed
    first_hard = next(i for i, r in enumerate(rows) if r["hard"])
    assert rows[first_hard - 1]["flops"] >= 0.75 * BUDGET > rows[first_hard - 2]["flops"]
    # the temperature reaches tau_min once decay_until * budget FLOPs ran
    done = [r for r, prev in zip(rows[1:], rows) if prev["flops"] >= 0.6 * BUDGET]
    assert done and all(r["temperature"] == pytest.approx(0.3) for r in done)
    assert max(r["max_experts_per_token"] for r in rows) <= 3  # the cap
    # the learning rate follows the executed share of the budget: monotone after the warmup, near its floor
    lrs = [r["lr"] for r in rows[5:]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.2 * 3e-3

    # cut after step 9: the warmup (5 steps) is over, so the cosine's start is recorded and must be restored
    train(budget_cfg(), tmp_path / "cut", env, stop_after=9)
    (ckpt,) = (tmp_path / "cut" / "checkpoints").glob("step_*")
    cut = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert cut["schedules"]["lr"]["start_flops"] == rows[4]["flops"]  # the FLOPs after the 5 warmup steps
    resumed = train(budget_cfg(), tmp_path / "cut", env, resume=True)
    got = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert [{k: r[k] for k in EXACT} for r in got] == [{k: r[k] for k in EXACT} for r in rows]
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_one_sync_step_scalars_match_the_per_value_reference(tmp_path, evomoe_cache, monkeypatch):
    seen = []
    original = Trainer.step_scalars

    def checked(self, total_loss, grad_norm, out, local):
        finite, flops = original(self, total_loss, grad_norm, out, local)
        rows = float(out.ffn_rows)  # the reference: one host read per value
        routed = sum(float(s.tokens) for s in out.stats) if self.model.spawned else 0.0
        dense = self.task.forward_dense_flops(local)
        want = step_flops(dense, rows, routed, self.cfg.model, self.cfg.moe.num_experts)
        assert flops == want and finite == bool(torch.isfinite(total_loss) and torch.isfinite(grad_norm))
        seen.append(self.model.spawned)
        return finite, flops

    monkeypatch.setattr(Trainer, "step_scalars", checked)
    train(
        budget_cfg(**{"train__max_flops": 0.0, "gate__clock": "steps", "train__steps": 12}),
        tmp_path,
        {"EVOMOE_CACHE": str(evomoe_cache)},
    )
    assert len(seen) == 12 and not seen[0] and seen[-1]


def test_lr_schedule_follows_the_executed_flops():
    lr = LRSchedule(lr=1.0, warmup=2, total=1000, min_ratio=0.1, max_flops=100.0)
    assert lr(0, 0.0) == 0.5 and lr(1, 5.0) == 1.0
    lr.observe(2, 20.0)  # the warmup ended with 20 FLOPs executed
    lr.observe(3, 30.0)  # recorded once
    assert lr.start_flops == 20.0
    assert lr(2, 20.0) == 1.0
    assert lr(7, 60.0) == pytest.approx(0.55)  # half-way from 20 to 100: the cosine's midpoint
    assert lr(9, 100.0) == pytest.approx(0.1) and lr(9, 150.0) == pytest.approx(0.1)
    assert LRSchedule(lr=1.0, warmup=2, total=12)(7) == pytest.approx(0.55)  # steps: unchanged


def test_flops_clock_endpoints():
    tau = TemperatureSchedule(
        2.0, 0.5, 10, "linear", start_step=3, clock="flops", start_flops=40.0, end_flops=140.0
    )
    assert (
        tau(3, 40.0) == 2.0 and tau(9, 90.0) == pytest.approx(1.25) and tau(20, 140.0) == pytest.approx(0.5)
    )
    assert tau(30, 500.0) == pytest.approx(0.5) and tau.progress(3, 0.0) == 0.0
    plan = PhasePlan(spawn_step=3, hard_after=1000, dense_to_sparse=True, hard_flops=100.0)
    for step, flops in ((3, 40.0), (4, 70.0), (5, 99.0)):
        plan.observe(step, flops)
        assert plan.phase(step) == "sparsify"
    plan.observe(6, 101.0)
    assert plan.hard_after == 3 and plan.phase(6) == "sparse" and plan.phase(100) == "sparse"
    plan.observe(7, 200.0)  # one way: fixed at the first crossing
    assert plan.hard_after == 3


def test_flops_clock_without_a_flops_budget_takes_the_shares_of_the_steps():
    cfg = load_config("tiny", ["--gate.clock=flops", "--gate.decay_until=0.5", "--gate.hard_at=0.75"])
    s = build_schedules(cfg)  # tiny: 60 steps, spawn at 16
    assert (s.tau.clock, s.tau.decay_steps, s.phases.hard_after) == ("steps", 30 - 16, 45 - 16)
    assert s.tau(30) == pytest.approx(cfg.gate.tau_min) and s.phases.phase(44) == "sparsify"
    assert s.phases.phase(45) == "sparse"


def test_budget_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"gate.hard_at = 0.2"):
        load_config("tiny", ["--gate.clock=flops", "--train.max_flops=1e9", "--gate.hard_at=0.2"])
    with pytest.raises(ConfigError, match=r"eval.router = 'train'.*'topk'"):
        load_config("tiny", ["--eval.router=train", "--router.name=topk"])


def test_value_at_and_equal_budgets():
    evals = [{"step": 4, "flops": 10.0, "val_loss": 5.0}, {"step": 8, "flops": 30.0, "val_loss": 3.0}]
    assert value_at(evals, "flops", 20.0) == 4.0 and value_at(evals, "step", 8) == 3.0
    assert value_at(evals, "flops", 40.0) is None and value_at(evals, "step", 2) is None
    cheap = [{"step": 4, "flops": 8.0, "val_loss": 6.0}, {"step": 12, "flops": 24.0, "val_loss": 4.0}]

    def run(ev):
        return {
            "stats": {"evals": ev, "entropy": 0.5},
            "steps": ev[-1]["step"],
            "train_flops": ev[-1]["flops"],
        }

    b = equal_budgets({"a": [run(evals)], "b": [run(cheap)]}, max_flops=25.0)
    assert b["steps"] == 8 and b["flops"] == 24.0
    assert b["methods"]["a"]["loss_at_flops"] == (pytest.approx(3.6), 0.0)
    assert b["methods"]["b"]["loss_at_steps"] == (pytest.approx(5.0), 0.0)
    assert b["methods"]["b"]["short_of_budget"] == 1 and b["methods"]["a"]["short_of_budget"] == 0


def test_compare_flops_gives_every_method_the_budget(cli, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "tiny", "--methods", "dts,dense", "--out", out, "--flops", "2.5e9"]
    args += short_overrides(eval_every=3, ckpt_every=100, log_every=3) + ["--train.steps=40"]
    rc, stdout, err = cli(*args)
    assert rc == 0, err[-3000:]
    summary = json.loads((out / "compare.json").read_text())
    budgets = summary["budgets"]
    for m in ("dts", "dense"):
        res = json.loads((out / "runs" / f"{m}-s0" / "results.json").read_text())
        assert 2.5e9 <= res["train_flops"] < 2.5e9 * 1.5 and res["steps"] < 40
        assert math.isfinite(budgets["methods"][m]["loss_at_flops"][0])
    assert budgets["methods"]["dense"]["final_steps"] > budgets["methods"]["dts"]["final_steps"]
    md = (out / "compare.md").read_text()
    assert "Equal budgets" in md and "## Target check: dts" in md and "| dense |" in md
    check = summary["target_check"]  # no switch run: no target, still the equal-FLOPs comparison
    assert check["steps_ratio"] is None and set(check["versus"]) == {"dense"}
    assert check["versus"]["dense"]["beyond"] is None  # one seed
    rc, _, err = cli(*args, "--candidate", "switch")
    assert rc == 2 and "--candidate = 'switch'" in err
    # --tabulate-only trains nothing: the finished runs are tabulated, a method without one is left out
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    rc, _, err = cli(*args[:3], "dts,dense,hash", *args[4:], "--tabulate-only")
    assert rc == 0 and "hash seed 0: no finished run" in err, err[-2000:]
    assert not (out / "runs" / "hash-s0").exists()
    assert before == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert set(json.loads((out / "compare.json").read_text())["methods"]) == {"dts", "dense"}
    rc, _, err = cli(*args[:3], "hash", *args[4:], "--tabulate-only")
    assert rc == 2 and "no finished run of hash" in err


def test_fused_adamw_matches_foreach():
    from evomoe.models import GPT
    from evomoe.tasks.lm import lm_forward
    from evomoe.train.optim import build_optimizer

    cfg = load_config("tiny", ["--model.vocab_size=50"])
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    params = []
    for impl in ("foreach", "fused"):
        cfg.train.optimizer_impl = impl
        torch.manual_seed(0)
        model = GPT(cfg.model, cfg.moe)
        opt = build_optimizer(model, cfg.train)
        assert bool(opt.defaults.get("fused")) == (impl == "fused")
        for _ in range(3):
            opt.zero_grad()
            lm_forward(model, idx, idx).loss.backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_eval_router_train_writes_both_evaluations(tmp_path, evomoe_cache):
    over = {"train__max_flops": 0.0, "gate__clock": "steps", "train__steps": 8, "eval__router": "train"}
    trainer = train(budget_cfg(**over), tmp_path, {"EVOMOE_CACHE": str(evomoe_cache)})
    evals = read_jsonl(tmp_path / "eval.jsonl")  # step 4: diversify; step 8: the soft phase (cap 3)
    assert [e["step"] for e in evals] == [4, 8]
    assert evals[0]["val_loss"] == evals[0]["val_loss_top1"]  # one dense FFN: the same model either way
    assert evals[1]["val_loss"] != evals[1]["val_loss_top1"] and evals[1]["experts_per_token"] > 1
    again = trainer.evaluate()  # the training selection is drawn from a fixed seed: repeatable
    assert again["val_loss"] == evals[1]["val_loss"] and again["val_loss_top1"] == evals[1]["val_loss_top1"]


def test_expert_lr_scale_applies_to_the_spawned_routed_experts_only():
    """train.expert_lr_scale: the routed experts of spawned layers step at the scaled rate (a first Adam
    step moves every parameter by about its group's lr), everything else at train.lr; before the spawn
    the dense FFN is not scaled; after the spawn the rebuilt optimizer keeps the scale."""
    from evomoe.evolve import spawn_model
    from evomoe.models import GPT
    from evomoe.moe.router import GateState
    from evomoe.tasks.lm import lm_forward
    from evomoe.train.optim import build_optimizer, rebuild_after_spawn, set_lr

    over = ["--model.vocab_size=50", "--train.expert_lr_scale=0.25", "--train.weight_decay=0"]
    cfg = load_config("tiny", over)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    opt = build_optimizer(model, cfg.train)
    assert all("lr_scale" not in g for g in opt.param_groups)  # diversify: one dense FFN, unscaled
    mapping = spawn_model(model, cfg, torch.Generator().manual_seed(0))
    opt = rebuild_after_spawn(opt, model, cfg.train, mapping, "fresh")
    set_lr(opt, 1e-3)
    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    for g in opt.param_groups:
        in_experts = {id(p) in experts for p in g["params"]}
        assert len(in_experts) == 1  # a group holds experts only or none
        assert g["lr"] == pytest.approx(2.5e-4 if in_experts == {True} else 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    lm_forward(model, idx, idx, gate=GateState(tau=2.0)).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = (p.detach() - before[n]).abs().max().item()
        if p.grad is not None and p.grad.abs().max() > 1e-6:
            want = 2.5e-4 if id(p) in experts else 1e-3
            assert moved == pytest.approx(want, rel=0.05), n
    with pytest.raises(ConfigError, match="train.expert_lr_scale = 0"):
        load_config("tiny", ["--train.expert_lr_scale=0"])
