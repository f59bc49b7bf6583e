"""The masked-LM and translation tasks through the trainer: every phase appears in eval.jsonl with the
task's metrics, a run stopped and resumed logs bitwise the rows and ends with bitwise the weights of the
uninterrupted run, ``evomoe eval`` reproduces the last evaluation, ``compare`` runs every method, and a
task paired with a model it cannot train is a config error naming both fields."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from short_run import run_trainer
from test_resume import exact_view

from evomoe.config import ConfigError, load_config
from evomoe.train.metrics import read_jsonl
from evomoe.train.trainer import Trainer

SHORT = [
    "--train.steps=12",
    "--evolve.diversify_steps=4",
    "--gate.decay_steps=4",
    "--gate.hard_after=4",
    "--train.threads=1",
    "--train.log_every=1",
    "--train.eval_every=4",
    "--train.ckpt_every=100",
    "--train.eval_batches=1",
    "--train.batch_size=8",
]
TASK_ARGS = {
    "tiny-mlm": ["--data.max_bytes=200000"],
    "tiny-mt": ["--task.mt.synthetic_pairs=1500", "--task.mt.eval_sentences=4"],
}
METRICS = {"tiny-mlm": "masked_accuracy", "tiny-mt": "bleu"}


def cfg_for(preset: str, tmp: Path, *extra: str):
    return load_config(preset, SHORT + TASK_ARGS[preset] + [f"--data.cache_dir={tmp}", *extra])


def run(preset: str, out: Path, cache: Path, stop_after: int | None = None, resume: bool = False) -> Trainer:
    return run_trainer(cfg_for(preset, cache), out, {}, stop_after, resume)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("seq_cache")


@pytest.mark.parametrize("preset", ["tiny-mlm", "tiny-mt"])
def test_phases_metrics_and_exact_resume(tmp_path, cache, preset):
    ref = run(preset, tmp_path / "ref", cache)
    evals = read_jsonl(tmp_path / "ref" / "eval.jsonl")
    assert [e["phase"] for e in evals] == ["diversify", "sparsify", "sparse"]
    assert all(math.isfinite(e[METRICS[preset]]) for e in evals)
    rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert rows[3]["experts_per_token"] == 1.0 and rows[5]["experts_per_token"] > 1.0  # dense, then soft
    assert rows[-1]["experts_per_token"] == 1.0  # hard top-1
    run(preset, tmp_path / "cut", cache, stop_after=6)
    cut = run(preset, tmp_path / "cut", cache, resume=True)
    assert exact_view(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == exact_view(rows)
    assert read_jsonl(tmp_path / "cut" / "eval.jsonl") == evals
    want, got = ref.model.state_dict(), cut.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    if preset == "tiny-mt":
        decoded = (tmp_path / "ref" / "translations" / "step_000012.jsonl").read_text().splitlines()
        assert len(decoded) == 4 and {"source", "reference", "greedy", "beam"} <= set(json.loads(decoded[0]))


def test_task_model_mismatch_names_both_fields():
    with pytest.raises(ConfigError, match=r"model\.name = 'decoder'.*task\.name = 'mt'"):
        load_config("tiny-mt", ["--model.name=decoder"])
    with pytest.raises(ConfigError, match=r"model\.name = 'encdec'.*task\.name = 'mlm'"):
        load_config("tiny-mlm", ["--model.name=encdec"])


@pytest.mark.slow
def test_train_eval_compare_from_the_cli(cli, tmp_path, cache):
    out = tmp_path / "mt"
    rc, stdout, err = cli("train", "tiny-mt", "--no-progress", "--out", out, *SHORT, *TASK_ARGS["tiny-mt"])
    assert rc == 0, err[-2000:]
    assert "BLEU (beam)" in stdout
    rc, stdout, err = cli("eval", out)
    assert rc == 0, err[-2000:]
    again, last = json.loads(stdout), read_jsonl(out / "eval.jsonl")[-1]
    assert again["bleu"] == last["bleu"] and again["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    methods = "dts,switch,gshard,base,hash,stablemoe,dense"
    cmp_out = tmp_path / "cmp"
    args = ["compare", "tiny-mt", "--methods", methods, "--out", cmp_out, *SHORT, *TASK_ARGS["tiny-mt"]]
    rc, stdout, err = cli(*args)
    assert rc == 0, err[-3000:]
    summary = json.loads((cmp_out / "compare.json").read_text())
    assert list(summary["methods"]) == methods.split(",")
