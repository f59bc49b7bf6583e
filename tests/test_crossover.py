"""``evomoe compare --flops A,B,C`` on synthetic run directories: several budgets, seeds, a method missing a
budget; the crossover table, MoE - dense with its standard error, the FLOPs to reach the dense model's final
loss, the plots; and the budget list's checks."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from evomoe.cli import main
from evomoe.compare import method_config
from evomoe.config import ConfigError, load_config, to_toml
from evomoe.crossover import budget_dir, flops_to_reach, parse_budgets

B1, B2 = 2e9, 8e9


def curve(final: float, budget: float) -> list[dict]:
    """An evaluation curve: loss falling linearly from final + 1 to ``final`` over the budget, 5 points."""
    return [{"step": 10 * i, "val_loss": final + 1.0 - 0.25 * i, "flops": budget * i / 4} for i in range(5)]


CAP = 100000  # train.steps given: the cap at the largest budget, B2; B1's is a quarter of it


def write_run(out: Path, method: str, seed: int, budget: float, final: float, steps: int = 0) -> None:
    """A finished run as ``compare`` leaves it: the method's config, results, metrics, evaluations."""
    steps = steps or math.ceil(CAP * budget / B2)
    base = load_config("tiny", [f"--train.max_flops={budget}", f"--train.steps={steps}"])
    run = budget_dir(out, budget) / "runs" / f"{method}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(method_config(base, method, seed)), encoding="utf-8")
    ev = curve(final, budget)
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    rows = [{"step": e["step"], "experts_per_token": 1.0, "dropped_fraction": 0.0} for e in ev[1:]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"val_loss": final, "val_ppl": math.exp(final), "train_flops": budget, "steps": 40,
               "tokens_per_s": 1000.0, "tokens": 1000}  # fmt: skip
    (run / "results.json").write_text(json.dumps(results))


FINALS = {  # (method, budget) -> final loss per seed; hash has no run at the small budget
    ("dense", B1): [4.00, 4.02],
    ("dense", B2): [3.50, 3.54],
    ("switch", B1): [4.20, 4.30],
    ("switch", B2): [3.40, 3.44],
    ("hash", B2): [3.60],
}


def test_crossover_tables_and_plots_from_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    for (method, budget), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_run(out, method, seed, budget, final)
    argv = ["compare", "tiny", "--methods", "dense,switch,hash", "--seeds", "2", "--flops", f"{B2},{B1}",
            "--train.steps=100000", "--tabulate-only", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = json.loads((out / "crossover.json").read_text())
    assert table["budgets"] == [B1, B2]  # sorted
    assert table["methods"] == ["dense", "switch", "hash"]
    k1, k2 = f"{B1:.6g}", f"{B2:.6g}"
    assert set(table["cells"]["hash"]) == {k2}  # missing at B1: an empty cell, not a guess
    sw = table["cells"]["switch"][k2]
    assert sw["seeds"] == 2 and sw["val_loss"] == pytest.approx(3.42)
    assert sw["val_loss_std"] == pytest.approx(statistics.stdev([3.40, 3.44]))
    d2 = table["minus_dense"]["switch"][k2]
    se = math.sqrt(statistics.stdev([3.40, 3.44]) ** 2 / 2 + statistics.stdev([3.50, 3.54]) ** 2 / 2)
    assert d2["diff"] == pytest.approx(3.42 - 3.52) and d2["se"] == pytest.approx(se)
    assert d2["z"] == pytest.approx((3.42 - 3.52) / se)
    assert table["minus_dense"]["switch"][k1]["diff"] == pytest.approx(4.25 - 4.01)
    assert table["minus_dense"]["hash"][k2]["se"] is None  # one seed: no standard error claimed
    reach = table["reach_dense"]
    assert reach["budget"] == B2 and reach["target"] == pytest.approx(3.52)
    # switch seed 0 (final 3.40) crosses 3.52 at 0.88 of its last quarter, seed 1 (3.44) at 0.92
    want = statistics.fmean([B2 * (0.75 + (3.65 - 3.52)), B2 * (0.75 + (3.69 - 3.52))])
    assert reach["methods"]["switch"]["flops"] == pytest.approx(want)
    assert reach["methods"]["switch"]["share_of_dense"] == pytest.approx(want / B2)
    assert reach["methods"]["hash"]["flops"] is None and reach["methods"]["hash"]["reached"] == "0/1"
    assert reach["methods"]["dense"]["reached"] == "1/2"  # the better seed reaches the mean, the other not
    md = (out / "crossover.md").read_text()
    assert "| hash |  | 3.6000 ± 0.0000 (1) |" in md
    assert "| switch | +0.2400 (se " in md
    for png in ("crossover_loss_vs_flops.png", "crossover_delta_vs_flops.png"):
        assert (out / png).stat().st_size > 1000
    for b, steps in ((B1, CAP // 4), (B2, CAP)):  # each budget is an ordinary comparison too ...
        assert (budget_dir(out, b) / "compare.md").is_file()
        base = load_config(str(budget_dir(out, b) / "base_config.toml"), saved=True)
        assert base.train.steps == steps and base.train.max_flops == b  # ... with the cap scaled to it
    assert "crossover.md" in capsys.readouterr().out


def test_a_budget_without_any_finished_run_is_left_out(tmp_path):
    out = tmp_path / "cmp"
    write_run(out, "dense", 0, B2, 3.5)
    argv = ["compare", "tiny", "--methods", "dense", "--flops", f"{B1},{B2}", "--train.steps=100000",
            "--tabulate-only", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "crossover.json").read_text())["budgets"] == [B2]


def test_flops_to_reach_interpolates_and_never_guesses():
    ev = [{"val_loss": 5.0, "flops": 0.0}, {"val_loss": 4.0, "flops": 10.0}, {"val_loss": 3.0, "flops": 20.0}]
    assert flops_to_reach(ev, 3.5) == pytest.approx(15.0)
    assert flops_to_reach(ev, 5.5) == 0.0
    assert flops_to_reach(ev, 2.9) is None


def test_budget_list_errors_name_the_flag_and_value():
    assert parse_budgets("1.6e13, 4e12") == [4e12, 1.6e13]
    assert parse_budgets(None) == []
    for bad, why in (("4e12,x", "'x' is not a number"), ("4e12,-1", "positive"), ("1e9,1e9", "twice"),
                     ("inf", "positive")):  # fmt: skip
        with pytest.raises(ConfigError, match=why) as e:
            parse_budgets(bad)
        assert "--flops" in str(e.value)


def test_one_budget_is_an_ordinary_comparison(tmp_path):
    out = tmp_path / "one"
    write_run(tmp_path / "x", "dense", 0, B1, 4.0, steps=CAP)  # a run laid out for a budget directory ...
    src = budget_dir(tmp_path / "x", B1) / "runs"
    (out / "runs").mkdir(parents=True)
    src.rename(out / "runs")  # ... moved where a one-budget comparison keeps it
    argv = ["compare", "tiny", "--methods", "dense", "--flops", f"{B1}", "--train.steps=100000",
            "--tabulate-only", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "compare.md").is_file() and not (out / "crossover.md").exists()


@pytest.mark.parametrize("preset", ["default", "crossover", "default-mlm", "default-mt"])
def test_every_shipped_method_is_valid_on_the_study_presets(preset):
    from evomoe.compare import method_names  # noqa: PLC0415

    base = load_config(preset, [])
    for name in method_names():
        method_config(base, name, 0)  # validated: a ConfigError names the field


@pytest.mark.parametrize("method", ["dts_fine_fixed", "dts_fine_nonoise"])
def test_the_study_evomoe_method_trains_through_its_phases(method, tmp_path, evomoe_cache):
    """The study's EvoMoE methods on the tiny preset, short: a dense start, the spawn into 16 half-width
    experts, a soft phase of up to 4 experts per token, then exactly 2 per token with both auxiliary losses
    logged and every loss finite."""
    from evomoe.train.metrics import read_jsonl  # noqa: PLC0415
    from evomoe.train.trainer import Trainer  # noqa: PLC0415

    base = load_config("tiny", ["--train.steps=40", "--train.log_every=1", "--train.eval_every=40"])
    cfg = method_config(base, method, 0)
    cfg.evolve.diversify_steps, cfg.train.threads, cfg.train.eval_batches = 4, 1, 1
    Trainer(cfg, tmp_path, env={"EVOMOE_CACHE": str(evomoe_cache)}, log=lambda s: None, progress=False).run()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in rows[:4]] == ["diversify"] * 4 and all(math.isfinite(r["loss"]) for r in rows)
    soft = [r["max_experts_per_token"] for r in rows if r["phase"] != "diversify" and not r["hard"]]
    assert soft and max(soft) == 4  # the cap at the spawn
    hard = [r for r in rows if r["hard"]]
    assert len(hard) > 20 and {r["experts_per_token"] for r in hard} == {2.0}
    assert all(set(r["aux"]) == {"balance", "z"} for r in hard)
