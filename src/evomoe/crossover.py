"""``evomoe compare --flops A,B,C``: every method at several training FLOPs budgets, and the crossover.

Budget ``b`` is an ordinary comparison in ``DIR/flops-<b>/`` (its runs, compare.md, compare.json; reused and
resumed like any other), run from the smallest budget up so the first rows arrive early. ``crossover.md`` /
``crossover.json`` then hold, per method and budget, the final validation loss (mean ± std over seeds) and
the training FLOPs executed; the difference of each MoE method to the dense model at each budget with its
standard error and z (when both have several seeds); and, at the largest budget, the FLOPs each method
needed to reach the dense model's final loss there (read off its validation curve, linearly between
evaluations) as a share of the dense model's. ``crossover_loss_vs_flops.png`` and
``crossover_delta_vs_flops.png`` plot both. A method missing at a budget (not run yet, or left out by
``--tabulate-only``) is an empty cell, never a guess. ``train.steps`` is the cap at the largest budget; a
smaller budget gets it scaled by its share (``budget_overrides``), so what is planned on the cap keeps its
share of every run.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from .compare import check_methods, cmd_compare, compare_methods
from .config import ConfigError, load_config, split_overrides
from .errors import CLIError

DENSE = "dense"


def parse_budgets(text: str | None) -> list[float]:
    """``--flops``: one budget or several, comma-separated, each a positive number; sorted, unique."""
    if text is None:
        return []
    out = []
    for part in [p.strip() for p in str(text).split(",")]:
        try:
            value = float(part)
        except ValueError:
            why = f"'{part}' is not a number (e.g. 4e12 or 4e12,1.6e13)"
            raise ConfigError(f"--flops = '{text}': {why}") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--flops = '{text}': every budget must be a positive number, got {part}")
        out.append(value)
    if len(set(out)) != len(out):
        raise ConfigError(f"--flops = '{text}': a budget is listed twice")
    return sorted(out)


def budget_dir(out: Path, budget: float) -> Path:
    return out / f"flops-{budget:.3g}"


def cmd_compare_budgets(args, extra: list[str]) -> int:
    """``evomoe compare``: one comparison; with several ``--flops`` budgets, one each and crossover.md."""
    budgets = parse_budgets(args.flops)
    if len(budgets) <= 1:
        args.flops = budgets[0] if budgets else None
        return cmd_compare(args, extra)
    overrides = split_overrides(extra)
    cap = load_config(args.config or "default", overrides).train.steps  # the cap at the largest budget
    bases = {b: load_config(args.config or "default", overrides + budget_overrides(b, budgets, cap))
             for b in budgets}  # fmt: skip
    methods = {b: check_methods(base, args) for b, base in bases.items()}  # every config checked first
    command = "evomoe compare " + " ".join(sys.argv[2:]) if args.command_line is None else args.command_line
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    per_budget: dict[float, dict[str, list[dict]]] = {}
    for b in budgets:
        log(f"==== budget {b:.3g} training FLOPs -> {budget_dir(out, b)}")
        try:
            _, runs = compare_methods(bases[b], methods[b], args, budget_dir(out, b), command, log)
        except CLIError:
            if not args.tabulate_only:
                raise
            log(f"==== budget {b:.3g}: no finished run yet, left out (--tabulate-only)")
            continue
        per_budget[b] = runs
    if not per_budget:
        raise CLIError(f"--tabulate-only: no finished run at any of the budgets {args.flops} in '{out}'")
    table = crossover(per_budget)
    table["command"] = command
    (out / "crossover.json").write_text(json.dumps(table, indent=1) + "\n")
    plot_crossover(table, out)
    md = write_crossover(table, out)
    print(md.read_text())
    print(f"written: {md} and {out / 'crossover.json'}; one compare.md per budget in {out}/flops-*/")
    return 0


def budget_overrides(budget: float, budgets: list[float], cap: int) -> list[str]:
    """The budget, and ``train.steps`` (the cap, given for the largest budget) scaled by the budget's share:
    what is planned on the step cap (StableMoE's stage 1, step-clock schedules) keeps its share of the run
    at every budget."""
    steps = max(1, math.ceil(cap * budget / max(budgets)))
    return [f"--train.max_flops={budget}", f"--train.steps={steps}"]


# --------------------------------------------------------------------------------------------- tables
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def flops_to_reach(evals: list[dict], target: float) -> float | None:
    """The training FLOPs at which a validation curve first reaches ``target``, linearly between the two
    evaluations around the crossing; None if it never does."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None or prev["val_loss"] == e["val_loss"]:
                return float(e["flops"])
            share = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return float(prev["flops"] + share * (e["flops"] - prev["flops"]))
        prev = e
    return None


def crossover(per_budget: dict[float, dict[str, list[dict]]]) -> dict:
    """The crossover record of per-budget runs (budget -> method -> run summaries with ``val_loss``,
    ``train_flops`` and ``stats.evals``)."""
    budgets = sorted(per_budget)
    methods: list[str] = []
    for b in budgets:
        methods += [m for m in per_budget[b] if m not in methods]
    cells: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for b in budgets:
        for m, rs in per_budget[b].items():
            mean, std = _mean_std([r["val_loss"] for r in rs])
            cells[m][f"{b:.6g}"] = {
                "seeds": len(rs),
                "val_loss": mean,
                "val_loss_std": std,
                "train_flops": statistics.fmean(r["train_flops"] for r in rs),
                "short_of_budget": sum(1 for r in rs if r["train_flops"] < b),
            }
    delta: dict[str, dict[str, dict]] = {}
    if DENSE in methods:
        for m in methods:
            if m == DENSE:
                continue
            delta[m] = {}
            for key, c in cells[m].items():
                d = cells[DENSE].get(key)
                if d is None:
                    continue
                diff = c["val_loss"] - d["val_loss"]
                se = None
                if c["seeds"] > 1 and d["seeds"] > 1:
                    se = math.sqrt(c["val_loss_std"] ** 2 / c["seeds"] + d["val_loss_std"] ** 2 / d["seeds"])
                z = diff / se if se else None
                delta[m][key] = {"diff": diff, "se": se, "z": z}
    return {
        "budgets": budgets,
        "methods": methods,
        "cells": cells,
        "minus_dense": delta,
        "reach_dense": reach_dense(per_budget),
    }


def reach_dense(per_budget: dict[float, dict[str, list[dict]]]) -> dict:
    """At the largest budget the dense model ran: each method's FLOPs to reach the dense model's mean final
    loss there (mean over seeds when every seed reaches it), and that as a share of the dense FLOPs."""
    with_dense = [b for b in sorted(per_budget) if DENSE in per_budget[b]]
    if not with_dense:
        return {}
    b = with_dense[-1]
    dense = per_budget[b][DENSE]
    target = statistics.fmean(r["val_loss"] for r in dense)
    dense_flops = statistics.fmean(r["train_flops"] for r in dense)
    methods = {}
    for m, rs in per_budget[b].items():
        reached = [flops_to_reach(r["stats"]["evals"], target) for r in rs]
        ok = [x for x in reached if x is not None]
        mean = statistics.fmean(ok) if len(ok) == len(rs) else None
        methods[m] = {
            "reached": f"{len(ok)}/{len(rs)}",
            "flops": mean,
            "share_of_dense": None if mean is None else mean / dense_flops,
        }
    return {"budget": b, "target": target, "dense_flops": dense_flops, "methods": methods}


def write_crossover(table: dict, out: Path) -> Path:
    keys = [f"{b:.6g}" for b in table["budgets"]]
    head = " | ".join(f"{b:.3g}" for b in table["budgets"])
    rule = "|---|" + "---|" * len(keys)
    lines = [
        "# evomoe compare: the crossover",
        "",
        f"Command: `{table['command']}`",
        "",
        "Final validation loss (mean ± std over seeds, seeds in brackets) at each training FLOPs budget "
        "(`train.max_flops`); `*`: a run that `train.steps` stopped short of its budget.",
        "",
        f"| method | {head} |",
        rule,
    ]
    for m in table["methods"]:
        row = []
        for k in keys:
            c = table["cells"][m].get(k)
            short = "*" if c and c["short_of_budget"] else ""
            cell = f"{c['val_loss']:.4f} ± {c['val_loss_std']:.4f} ({c['seeds']}){short}" if c else ""
            row.append(cell)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if table["minus_dense"]:
        lines += ["", "MoE - dense (negative: the MoE is better; se and z when both have several seeds):", ""]
        lines += [f"| method | {head} |", rule]
        for m, cols in table["minus_dense"].items():
            row = []
            for k in keys:
                d = cols.get(k)
                se = "" if d is None or d["se"] is None else f" (se {d['se']:.4f}, z {d['z']:+.1f})"
                row.append("" if d is None else f"{d['diff']:+.4f}{se}")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    reach = table["reach_dense"]
    if reach:
        lines += [
            "",
            f"At {reach['budget']:.3g} FLOPs: training FLOPs to reach the dense model's final loss "
            f"{reach['target']:.4f} (linear between evaluations; mean over seeds when all reach it):",
            "",
            "| method | reached | FLOPs | share of dense's |",
            "|---|---|---|---|",
        ]
        for m, r in reach["methods"].items():
            flops = "not reached" if r["flops"] is None else f"{r['flops']:.3g}"
            share = "-" if r["share_of_dense"] is None else f"{r['share_of_dense']:.2f}"
            lines.append(f"| {m} | {r['reached']} | {flops} | {share} |")
    lines += ["", "![loss vs FLOPs](crossover_loss_vs_flops.png)", "",
              "![MoE - dense vs FLOPs](crossover_delta_vs_flops.png)"]  # fmt: skip
    path = out / "crossover.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_crossover(table: dict, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    keys = [f"{b:.6g}" for b in table["budgets"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in table["methods"]:
        cs = [table["cells"][m][k] for k in keys if k in table["cells"][m]]
        xs, ys, es = ([c[f] for c in cs] for f in ("train_flops", "val_loss", "val_loss_std"))
        ax.errorbar(xs, ys, yerr=es, fmt="o-", ms=4, capsize=3, label=m)
    ax.set(xscale="log", xlabel="training FLOPs executed", ylabel="final validation loss (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "crossover_loss_vs_flops.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    budgets = dict(zip(keys, table["budgets"]))
    for m, cols in table["minus_dense"].items():
        ks = [k for k in keys if k in cols]
        es = [2 * cols[k]["se"] if cols[k]["se"] else 0.0 for k in ks]
        ax.errorbar([budgets[k] for k in ks], [cols[k]["diff"] for k in ks], yerr=es, fmt="o-", ms=4,
                    capsize=3, label=m)  # fmt: skip
    ax.axhline(0.0, color="grey", lw=1, ls="--", label="dense")
    ylabel = "MoE - dense validation loss (error bar: 2 se)"
    ax.set(xscale="log", xlabel="training FLOPs budget", ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "crossover_delta_vs_flops.png", dpi=110)
    plt.close(fig)
