"""The measured rows of docs/routers.md from an ``evomoe compare`` directory.

    evomoe compare benchmarks/routers.toml --methods act_dts,dselect_k,... --seeds 1 --out R
    python benchmarks/routers_table.py R

Per method (first seed): final validation loss, training FLOPs executed, experts per token (mean over the
run's training steps; in the last logged interval: mean, max; at evaluation), and, where the run logged
them, the last interval's chunk sparsity, load CV and experts without a token (summed over layers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def last_row(path: Path) -> dict:
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(root: Path) -> list[str]:
    summary = json.loads((root / "compare.json").read_text())
    lines = [
        "| method | val loss | train FLOPs | experts/token (run mean) | last interval: mean / max "
        "| eval experts/token | chunk sparsity | load CV | experts without a token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        run = root / "runs" / f"{name}-s{m['seeds'][0]}"
        last, ev = last_row(run / "metrics.jsonl"), last_row(run / "eval.jsonl")
        k_last = fmt(last.get("experts_per_token"), ".2f")
        k_max = fmt(last.get("max_experts_per_token"), ".0f")
        lines.append(
            f"| {name} | {m['val_loss']:.4f} | {m['train_flops']:.3g} | {m['experts_per_token']:.2f} "
            f"| {k_last} / {k_max} "
            f"| {fmt(ev.get('experts_per_token'), '.2f')} | {fmt(last.get('chunk_sparsity'), '.2f')} "
            f"| {fmt(last.get('load_cv'), '.2f')} | {fmt(last.get('dead_experts'), 'd')} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(table(Path(sys.argv[1]))))
