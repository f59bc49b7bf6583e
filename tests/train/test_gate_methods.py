"""``evomoe compare`` runs every gate of the field as a method (one TOML fragment each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from short_run import short_overrides

GATES = "act_dts,dselect_k,comet,sigma,blockffn,remoe,stat_topk,auxfree"


def test_compare_every_gate(cli, tmp_path: Path):
    out = tmp_path / "gates"
    rc, _, err = cli(
        "compare", "tiny", "--methods", GATES, "--seeds", "1", "--out", out,
        *short_overrides(eval_every=12, ckpt_every=12, log_every=4),
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    summary = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    for m in GATES.split(","):
        assert f"| {m} |" in table
        r = summary["methods"][m]
        assert math.isfinite(r["val_loss"]) and r["train_flops"] > 0 and r["experts_per_token"] >= 1.0
    assert summary["methods"]["auxfree"]["experts_per_token"] == 1.0  # top-1 with the bias
    rows = [
        json.loads(line) for line in (out / "runs" / "blockffn-s0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"k_mean", "k_std", "k_max", "chunk_sparsity", "load_cv", "dead_experts"} <= set(
        rows[-1]["layers"]
    )
