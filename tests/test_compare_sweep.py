"""``compare``'s aggregation on synthetic run directories (means, spreads, steps and FLOPs to the Switch
target over several seeds, seeds that never reach it) and ``evomoe sweep`` end to end on the tiny preset."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from evomoe.compare import aggregate, method_config, run_stats
from evomoe.config import load_config
from evomoe.train.metrics import read_jsonl
from evomoe.verdict import check_lines, crossing, target_check


def write_run(
    root: Path, name: str, evals: list[tuple[int, float]], flops_per_step: float, epts: list[float]
):
    """A run directory as the trainer leaves it: metrics rows every 50 steps then every 100, eval rows."""
    out = root / name
    out.mkdir(parents=True)
    steps = [50, 100, 200, 300, 400, 500][: len(epts)]
    rows = [{"step": s, "experts_per_token": e, "dropped_fraction": 0.01 * e} for s, e in zip(steps, epts)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = [{"step": s, "val_loss": v, "flops": s * flops_per_step} for s, v in evals]
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    return out


def summary(out: Path, seed: int, flops_per_step: float) -> dict:
    evals = read_jsonl(out / "eval.jsonl")
    final = evals[-1]["val_loss"]
    return {
        "seed": seed,
        "val_loss": final,
        "val_ppl": math.exp(final),
        "train_flops": evals[-1]["step"] * flops_per_step,
        "tokens_per_s": 1000.0 + seed,
        "stats": run_stats(out),
    }


SWITCH = {  # finals 4.70 / 4.77 / 4.84: target 4.77; seed 2 dips below it at step 400, then rises
    0: [(100, 5.5), (200, 5.2), (300, 5.0), (400, 4.9), (500, 4.70)],
    1: [(100, 5.4), (200, 5.1), (300, 4.95), (400, 4.8), (500, 4.77)],
    2: [(100, 5.3), (200, 5.0), (300, 4.9), (400, 4.76), (500, 4.84)],
}
DTS = {  # reaches 4.77 at 300, 300, 200
    0: [(100, 5.0), (200, 4.8), (300, 4.7), (400, 4.5), (500, 4.46)],
    1: [(100, 5.1), (200, 4.9), (300, 4.77), (400, 4.5), (500, 4.47)],
    2: [(100, 4.9), (200, 4.75), (300, 4.6), (400, 4.5), (500, 4.45)],
}
HASH = {0: [(100, 5.9), (500, 4.9)], 1: [(100, 5.8), (500, 4.6)]}  # one seed never reaches the target


def test_aggregate_over_seeds_on_synthetic_run_directories(tmp_path):
    runs = {}
    for method, table, fps in (("switch", SWITCH, 1.0e10), ("dts", DTS, 2.75e10), ("hash", HASH, 1.0e10)):
        epts = [8.0, 6.0, 2.0, 1.0, 1.0, 1.0] if method == "dts" else [1.0] * 6
        runs[method] = [
            summary(write_run(tmp_path, f"{method}-s{s}", ev, fps, epts), s, fps) for s, ev in table.items()
        ]
    got = aggregate(runs)
    assert got["target_method"] == "switch"
    assert got["target_val_loss"] == pytest.approx((4.70 + 4.77 + 4.84) / 3)

    sw, dts, hsh = (got["methods"][m] for m in ("switch", "dts", "hash"))
    assert sw["seeds"] == [0, 1, 2] and sw["reached"] == "3/3"
    assert sw["steps_to_target"] == pytest.approx((500 + 500 + 400) / 3)
    assert sw["flops_to_target"] == pytest.approx((500 + 500 + 400) / 3 * 1e10)
    assert dts["steps_to_target"] == pytest.approx((300 + 300 + 200) / 3)
    assert dts["flops_to_target"] == pytest.approx((300 + 300 + 200) / 3 * 2.75e10)
    assert hsh["reached"] == "1/2" and hsh["steps_to_target"] is None and hsh["flops_to_target"] is None

    finals = [4.46, 4.47, 4.45]
    assert dts["val_loss"] == pytest.approx(statistics.fmean(finals))
    assert dts["val_loss_std"] == pytest.approx(statistics.stdev(finals))  # sample spread over seeds
    assert dts["val_ppl"] == pytest.approx(math.exp(statistics.fmean(finals)))
    assert dts["train_flops"] == pytest.approx(500 * 2.75e10)
    assert dts["tokens_per_s"] == pytest.approx(1001.0)
    # rows at 50, 100, 200, ... weigh by the steps they cover: (50*8 + 50*6 + 100*2 + 300*1) / 500
    assert dts["experts_per_token"] == pytest.approx((50 * 8 + 50 * 6 + 100 * 2 + 300 * 1) / 500)
    assert dts["dropped_fraction"] == pytest.approx(0.01 * dts["experts_per_token"])
    # the README's ratios are these fields: steps (switch / dts) and FLOPs (dts to target / switch total)
    assert sw["steps_to_target"] / dts["steps_to_target"] == pytest.approx(1400 / 800)
    assert dts["flops_to_target"] / sw["train_flops"] == pytest.approx(800 / 3 * 2.75e10 / 5e12)


def test_aggregate_without_the_target_method_reports_no_targets(tmp_path):
    runs = {"dts": [summary(write_run(tmp_path, "dts-s0", DTS[0], 1e10, [1.0]), 0, 1e10)]}
    got = aggregate(runs)
    assert got["target_val_loss"] is None
    assert got["methods"]["dts"]["steps_to_target"] is None and got["methods"]["dts"]["val_loss_std"] == 0.0


def test_sweep_trains_every_variant_tabulates_them_and_reuses_finished_runs(cli, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "tiny", "--vary", "evolve.spawn=copy,mask", "--out", out]
    args += ["--train.steps=12", "--evolve.diversify_steps=4", "--gate.decay_steps=4", "--gate.hard_after=4"]
    args += ["--train.threads=1", "--train.eval_batches=1", "--train.eval_every=4", "--train.log_every=4"]
    rc, stdout, err = cli(*args)
    assert rc == 0, err
    doc = json.loads((out / "sweep.json").read_text())
    runs = sorted(p.name for p in (out / "runs").iterdir())
    doc_seed = runs[0].rsplit("-s", 1)[1]
    assert set(doc["variants"]) == {"base", "evolve.spawn=mask"} and len(runs) == 2  # copy is the base
    for name, row in doc["variants"].items():
        run = out / "runs" / f"{name}-s{doc_seed}"
        res = json.loads((run / "results.json").read_text())
        assert row["val_loss"] == pytest.approx(res["val_loss"]) and row["val_loss_std"] == 0.0
        evals = read_jsonl(run / "eval.jsonl")
        first = next((e["step"] for e in evals if e["val_loss"] <= doc["base_val_loss"]), None)
        assert row["steps_to_base"] == first
    assert doc["base_val_loss"] == pytest.approx(doc["variants"]["base"]["val_loss"])
    assert doc["variants"]["base"]["steps_to_base"] == 12  # the base reaches its own final loss at the end
    assert "| evolve.spawn=mask |" in (out / "sweep.md").read_text()

    rc, stdout, err = cli(*args)  # again: nothing trains, the same table
    assert rc == 0 and err.count("reusing finished run") == 2, err
    assert json.loads((out / "sweep.json").read_text())["variants"] == doc["variants"]


def test_target_check_reads_speed_ratios_and_the_seed_noise_margin():
    """Hand-made tables: the ratios are to the reference's own final steps/FLOPs; 'beyond' needs the
    difference to exceed two of the larger seed standard deviation; one seed gives no verdict."""
    methods = {
        "cand": {"seeds": [0, 1, 2], "steps_to_target": 800.0, "flops_to_target": 1.2e13},
        "switch": {"seeds": [0, 1, 2], "steps_to_target": 2000.0, "flops_to_target": 2.0e13},
        "dense": {"seeds": [0, 1], "steps_to_target": None, "flops_to_target": None},
        "hash": {"seeds": [0], "steps_to_target": None, "flops_to_target": None},
    }
    summary = {"target_method": "switch", "target_val_loss": 4.1, "methods": methods}
    at = {"cand": (4.0, 0.01), "switch": (4.1, 0.02), "dense": (4.03, 0.02), "hash": (3.9, 0.0)}
    budgets = {
        "flops": 2.0e13,
        "methods": {
            m: {"loss_at_flops": v, "final_steps": 2000.0, "final_flops": 2.4e13} for m, v in at.items()
        },
    }
    check = target_check(summary, budgets, "cand")
    assert check["steps_ratio"] == pytest.approx(0.4) and check["flops_ratio"] == pytest.approx(0.5)
    sw, dense, hsh = (check["versus"][m] for m in ("switch", "dense", "hash"))
    assert sw["diff"] == pytest.approx(-0.1) and sw["margin"] == pytest.approx(0.04) and sw["beyond"]
    assert dense["diff"] == pytest.approx(-0.03) and dense["beyond"] is False  # inside 2 x 0.02
    assert hsh["beyond"] is None and hsh["margin"] is None  # one seed: no spread to judge by
    assert check["below_all_beyond_noise"] is False
    text = "\n".join(check_lines(check))
    assert "**0.40x** switch's steps" in text and "| hash | +0.1000 | n/a (one seed) | n/a |" in text

    del methods["hash"], budgets["methods"]["hash"]
    budgets["methods"]["dense"]["loss_at_flops"] = (4.05, 0.02)
    assert target_check(summary, budgets, "cand")["below_all_beyond_noise"] is True
    methods["cand"]["steps_to_target"] = None  # never reached: no ratios
    check = target_check(summary, budgets, "cand")
    assert check["steps_ratio"] is None and "does not reach" in "\n".join(check_lines(check))
    assert target_check(summary, budgets, "absent") is None


def test_target_check_interpolates_the_crossing_between_evaluations():
    """The second reading: the step/FLOPs where the curve crosses the target, linearly between the last
    evaluation above it and the first at or below it, as ratios of the reference's final steps/FLOPs."""
    ev = lambda *pts: [{"step": s, "flops": 10.0 * s, "val_loss": v} for s, v in pts]  # noqa: E731
    assert crossing(ev((100, 5.0), (200, 4.0), (300, 3.0)), 4.5) == pytest.approx((150.0, 1500.0))
    assert crossing(ev((100, 5.0), (200, 4.0)), 4.0) == pytest.approx((200.0, 2000.0))  # exactly at one
    assert crossing(ev((100, 3.0), (200, 2.0)), 4.0) == pytest.approx((100.0, 1000.0))  # below from the start
    assert crossing(ev((100, 5.0), (200, 4.5)), 4.0) is None
    methods = {
        "cand": {"seeds": [0, 1], "steps_to_target": 200.0, "flops_to_target": 2000.0},
        "switch": {"seeds": [0, 1], "steps_to_target": 400.0, "flops_to_target": 4000.0},
    }
    summary = {"target_method": "switch", "target_val_loss": 4.5, "methods": methods}
    row = {"loss_at_flops": (4.0, 0.0), "final_steps": 400.0, "final_flops": 4000.0}
    budgets = {"flops": 4000.0, "methods": {"cand": row, "switch": dict(row)}}
    runs = {
        "cand": [
            {"stats": {"evals": ev((100, 5.0), (200, 4.0))}},
            {"stats": {"evals": ev((100, 4.75), (200, 4.25))}},
        ]
    }
    check = target_check(summary, budgets, "cand", runs=runs)
    assert check["steps_ratio"] == pytest.approx(0.5)  # the first evaluations at or below: 200 and 200
    assert check["interpolated_ratios"] == pytest.approx((0.375, 0.375))  # crossings at 150 and 150
    assert "crossing: 0.38x and 0.38x" in "\n".join(check_lines(check))
    assert target_check(summary, budgets, "cand")["interpolated_ratios"] is None  # without runs: none


VARIANTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "dts_variants").glob("*.toml"))


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.stem)
def test_every_dts_variant_fragment_is_a_valid_method(path):
    """The variant fragments that docs/results.md section 7 runs load on the default preset and validate;
    each changes the routing to a DTS gate."""
    cfg = method_config(load_config("default"), str(path), seed=3)
    assert cfg.router.name in ("dts", "dts_plus") and cfg.train.seed == 3
