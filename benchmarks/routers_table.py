"""The measured rows of docs/routers.md, read from an ``evomoe compare`` directory's finished runs.

    evomoe compare benchmarks/routers.toml --methods act_dts,dselect_k,... --seeds 1 --out R
    python benchmarks/routers_table.py R act_dts,dselect_k,...

Per method (seed 0): final validation loss, training FLOPs executed, experts per token (mean over the
run's training steps, as compare.md; in the last logged interval: mean and max; at the last evaluation),
and, where the run logged them, the last interval's chunk sparsity, load CV and experts without a token
(summed over layers). Runs that have not finished are listed as such.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from evomoe.compare import run_stats
from evomoe.train.metrics import read_jsonl


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def row(name: str, run: Path) -> str:
    if not (run / "results.json").is_file():
        return f"| {name} | (not finished) |" + " |" * 8
    res = json.loads((run / "results.json").read_text())
    rows, evals = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "eval.jsonl")
    last, ev = rows[-1] if rows else {}, evals[-1] if evals else {}
    k_last = fmt(last.get("experts_per_token"), ".2f")
    k_max = fmt(last.get("max_experts_per_token"), ".0f")
    return (
        f"| {name} | {res['val_loss']:.4f} | {res['train_flops']:.3g} "
        f"| {run_stats(run)['experts_per_token']:.2f} | {k_last} / {k_max} "
        f"| {fmt(ev.get('experts_per_token'), '.2f')} | {fmt(last.get('chunk_sparsity'), '.2f')} "
        f"| {fmt(last.get('load_cv'), '.2f')} | {fmt(last.get('dead_experts'), 'd')} "
        f"| {res['train_seconds']:.0f} |"
    )


def table(root: Path, methods: list[str]) -> list[str]:
    lines = [
        "| method | val loss | train FLOPs | experts/token (run mean) | last interval: mean / max "
        "| eval experts/token | chunk sparsity | load CV | experts without a token | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [row(m, root / "runs" / f"{m}-s0") for m in methods]


if __name__ == "__main__":
    print("\n".join(table(Path(sys.argv[1]), sys.argv[2].split(","))))
