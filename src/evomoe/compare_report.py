"""The tables and plots of ``evomoe compare``: compare.md and the validation curves."""

from __future__ import annotations

import statistics
from pathlib import Path

from .verdict import check_lines


def budget_lines(budgets: dict) -> list[str]:
    """The markdown table of ``equal_budgets``."""
    if budgets["steps"] is None:
        return []
    lines = [
        "",
        f"Equal budgets: validation loss at {budgets['steps']} steps and at {budgets['flops']:.4g} training "
        "FLOPs executed (the largest each run reached; linear between evaluations). Entropy: mean routing "
        "entropy (nats) over the run; diversity: the experts' mean pairwise cosine distance at the end.",
        "",
        f"| method | val loss at {budgets['steps']} steps | val loss at {budgets['flops']:.3g} FLOPs "
        "| steps run | FLOPs run | entropy | diversity |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in budgets["methods"].items():
        cell = lambda v: "n/a" if v is None else f"{v[0]:.4f} ± {v[1]:.4f}"  # noqa: E731
        short = f" ({r['short_of_budget']} stopped by train.steps)" if r["short_of_budget"] else ""
        div = "-" if r["expert_diversity"] is None else f"{r['expert_diversity']:.3f}"
        lines.append(
            f"| {m} | {cell(r['loss_at_steps'])} | {cell(r['loss_at_flops'])} "
            f"| {r['final_steps']:.0f}{short} | {r['final_flops']:.3g} | {r['entropy']:.2f} | {div} |"
        )
    return lines


def _fmt(x, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def write_markdown(
    summary: dict, out: Path, command: str, budgets: dict | None = None, check: dict | None = None
) -> Path:
    t = summary["target_val_loss"]
    lines = [
        "# evomoe compare",
        "",
        f"Command: `{command}`",
        "",
        f"Target: the {summary['target_method']} baseline's mean final validation loss"
        + (f" = {t:.4f}" if t is not None else " (not run)"),
        "",
        "| method | seeds | val loss (mean ± std) | val ppl | train FLOPs | tokens/s | experts/token "
        "| dropped | steps to target | FLOPs to target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    extra = list(next(iter(summary["methods"].values()), {}).get("metrics", {}))
    if extra:
        lines[-2] = lines[-2].removesuffix(" |") + " | " + " | ".join(extra) + " |"
        lines[-1] += "---|" * len(extra)
    for m, r in summary["methods"].items():
        cells = "".join(f" {mean:.4g} ± {std:.2g} |" for mean, std in r.get("metrics", {}).values())
        lines.append(
            f"| {m} | {len(r['seeds'])} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_ppl']:.2f} "
            f"| {r['train_flops']:.3g} "
            f"| {r['tokens_per_s']:,.0f} | {r['experts_per_token']:.2f} | {r['dropped_fraction']:.3f} "
            f"| {_fmt(r['steps_to_target'], '.0f')} ({r['reached']}) | {_fmt(r['flops_to_target'], '.3g')} |"
            + cells
        )
    lines += budget_lines(budgets) if budgets else []
    lines += check_lines(check)
    lines += [
        "",
        "![validation loss vs step](val_loss_vs_step.png)",
        "",
        "![validation loss vs FLOPs](val_loss_vs_flops.png)",
    ]
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_curves(runs: dict[str, list[dict]], out: Path, budgets: dict | None = None) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    for key, label, fname in (
        ("step", "step", "val_loss_vs_step.png"),
        ("flops", "training FLOPs executed", "val_loss_vs_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for method, rs in runs.items():
            curves = [r["stats"]["evals"] for r in rs]
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            xs = [statistics.fmean(c[i][key] for c in curves) for i in range(n)]
            ys = [statistics.fmean(c[i]["val_loss"] for c in curves) for i in range(n)]
            ax.plot(xs, ys, "o-", ms=3, label=method)
        at = (budgets or {}).get("steps" if key == "step" else "flops")
        if at is not None:  # where the budget table reads every method at an equal budget
            what = "steps" if key == "step" else "FLOPs"
            ax.axvline(at, color="grey", ls="--", lw=1, label=f"equal {what}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (mean over seeds)")
        if key == "flops":
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
