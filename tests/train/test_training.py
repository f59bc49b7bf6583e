"""Training acceptance on the tiny preset: the files a run writes, the three phases as seen in the
metrics, ``evomoe eval``, ``--resume`` of a finished run, and ``evomoe compare`` (every method, reuse of
finished runs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from short_run import short_overrides

from evomoe.config import load_config
from evomoe.train.metrics import read_jsonl

E = 4  # tiny preset: moe.num_experts
METRIC_FIELDS = (
    "step",
    "phase",
    "loss",
    "lr",
    "temperature",
    "experts_per_token",
    "dropped_fraction",
    "load_cv",
    "tokens_per_s",
    "flops",
)
PNGS = (
    "loss_vs_step.png",
    "loss_vs_flops.png",
    "experts_per_token.png",
    "temperature.png",
    "tokens_per_expert.png",
)


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under a run directory (PNGs and report aside) with its bytes."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.suffix != ".png" and p.name != "report.md"
    }


def test_tiny_run_writes_every_file(tiny_run: Path):
    for name in ("config.toml", "metrics.jsonl", "eval.jsonl", "report.md", "results.json", *PNGS):
        assert (tiny_run / name).is_file(), name
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000036", "step_00000039", "step_00000040"]  # keep_checkpoints = 3
    assert (tiny_run / "checkpoints" / "latest").read_text() == "step_00000040"
    cfg = load_config(str(tiny_run / "config.toml"))
    assert cfg.train.steps == 40 and cfg.model.vocab_size == 256  # vocab taken from the byte tokenizer
    report = (tiny_run / "report.md").read_text()
    for png in PNGS:
        assert f"({png})" in report
    rows = read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    for r in rows:
        missing = [f for f in METRIC_FIELDS if f not in r]
        assert not missing, (r["step"], missing)
    evals = read_jsonl(tiny_run / "eval.jsonl")
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    for e in evals:
        assert {"step", "val_loss", "val_ppl"} <= set(e) and e["val_ppl"] == math.exp(e["val_loss"])


def test_experts_per_token_follows_the_phases(tiny_run: Path):
    rows = read_jsonl(tiny_run / "metrics.jsonl")
    by_phase: dict[str, list[dict]] = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append(r)
    assert [r["step"] for r in by_phase["diversify"]] == list(range(1, 11))
    assert [r["step"] for r in by_phase["sparsify"]] == list(range(11, 31))
    assert [r["step"] for r in by_phase["sparse"]] == list(range(31, 41))
    assert all(r["experts_per_token"] == 1.0 for r in by_phase["diversify"])
    assert all(r["temperature"] is None for r in by_phase["diversify"])  # no gate before the spawn
    sparsify = by_phase["sparsify"]
    assert sparsify[0]["experts_per_token"] >= 0.95 * E  # tau_max = 2: every expert above the threshold
    assert sparsify[0]["temperature"] == 2.0  # decays over 10 steps, then held
    assert all(math.isclose(r["temperature"], 0.3) for r in sparsify[10:] + by_phase["sparse"])
    first, last = sparsify[0]["experts_per_token"], sparsify[-1]["experts_per_token"]
    assert last < first - 0.5, (first, last)
    assert all(
        r["experts_per_token"] == 1.0 and r["max_experts_per_token"] == 1.0 for r in by_phase["sparse"]
    )


def test_validation_loss_falls_and_flops_accumulate(tiny_run: Path):
    evals = read_jsonl(tiny_run / "eval.jsonl")
    losses = [e["val_loss"] for e in evals]
    assert losses[-1] < losses[0] - 0.5, losses
    rows = read_jsonl(tiny_run / "metrics.jsonl")
    flops = [r["flops"] for r in rows]
    assert flops[0] > 0 and all(b > a for a, b in zip(flops, flops[1:], strict=False))
    # more FLOPs per step while several experts run per token than in the dense phase or top-1 phase
    per_step = [b - a for a, b in zip(flops, flops[1:], strict=False)]
    assert max(per_step[10:20]) > per_step[2] and max(per_step[10:20]) > per_step[-1]
    assert [e["flops"] for e in evals] == [rows[e["step"] - 1]["flops"] for e in evals]
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["train_flops"] == flops[-1] and results["val_loss"] == losses[-1]
    assert results["skipped_steps"] == 0


def test_eval_command_prints_json(cli, tiny_run: Path):
    before = snapshot(tiny_run)
    rc, out, err = cli("eval", tiny_run)
    assert rc == 0, err
    result = json.loads(out)
    assert result["step"] == 40
    last = read_jsonl(tiny_run / "eval.jsonl")[-1]
    assert math.isclose(result["val_loss"], last["val_loss"], rel_tol=1e-6)
    assert snapshot(tiny_run) == before  # eval writes nothing


def test_resume_of_a_finished_run_is_a_noop_that_reprints(cli, copy_run, tiny_args):
    run = copy_run()
    before = snapshot(run)
    rc, out, err = cli("train", *tiny_args, "--out", run, "--resume")
    assert rc == 0, err
    assert "done: 40 steps" in out and "validation loss" in out
    assert "resuming from" in err and "step_00000040" in err
    after = snapshot(run)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], changed


def test_compare_every_method_and_reuse(cli, tmp_path: Path):
    out = tmp_path / "cmp"
    methods = "dts,switch,gshard,base,hash,stablemoe,soft,dense"
    args = [
        "compare",
        "tiny",
        "--methods",
        methods,
        "--out",
        out,
        *short_overrides(eval_every=6, ckpt_every=12, log_every=3),
    ]
    rc, stdout, err = cli(*args)
    assert rc == 0, err[-3000:]
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["methods"]) == methods.split(",")
    table = (out / "compare.md").read_text()
    for m in methods.split(","):
        assert f"| {m} |" in table
        r = summary["methods"][m]
        assert math.isfinite(r["val_loss"]) and r["train_flops"] > 0
    assert summary["methods"]["soft"]["experts_per_token"] == E
    assert summary["methods"]["switch"]["experts_per_token"] <= 1.0
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.jsonl")}
    assert len(mtimes) == 8

    rc, stdout2, err2 = cli(*args)
    assert rc == 0, err2[-3000:]
    assert err2.count("reusing finished run") == 8
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    again = json.loads((out / "compare.json").read_text())
    assert again["methods"] == summary["methods"]
