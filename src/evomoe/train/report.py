"""``report.md`` with PNG plots from a run directory's metrics.jsonl and eval.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import read_jsonl  # noqa: E402

PHASE_COLORS = {"diversify": "#e8f0fe", "sparsify": "#fef3e0", "sparse": "#e9f7ef"}


def _shade_phases(ax, rows: list[dict]) -> None:
    start, phase = 0, None
    for r in rows + [{"step": rows[-1]["step"], "phase": None}]:
        if r["phase"] != phase:
            if phase is not None:
                ax.axvspan(start, r["step"], color=PHASE_COLORS.get(phase, "#eee"), lw=0, label=phase)
            start, phase = r["step"], r["phase"]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_loss(rows, evals, out: Path) -> list[str]:
    names = []
    for x_key, label, fname in (
        ("step", "step", "loss_vs_step.png"),
        ("flops", "training FLOPs executed", "loss_vs_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        if x_key == "step":
            _shade_phases(ax, rows)
        ax.plot([r[x_key] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss")
        if evals:
            ax.plot([e[x_key] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        if x_key == "flops":
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        names.append(_save(fig, out / fname))
    return names


def plot_series(rows, key: str, ylabel: str, out: Path, fname: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _shade_phases(ax, rows)
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if pts:
        ax.plot(*zip(*pts), lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, out / fname)


def plot_expert_load(rows, out: Path) -> str | None:
    """Mean share of routed pairs per expert over the last phase, one row per MoE layer."""
    last_phase = rows[-1]["phase"]
    loads = [r["tokens_per_expert"] for r in rows if r["phase"] == last_phase and r.get("tokens_per_expert")]
    loads = [x for x in loads if len(x[0]) == len(loads[-1][0])]
    if not loads or len(loads[-1][0]) < 2:
        return None
    mat = np.mean(np.array(loads), axis=0)
    fig, ax = plt.subplots(figsize=(max(4, mat.shape[1] * 0.5 + 2), max(2.5, mat.shape[0] * 0.5 + 1.5)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis")
    ax.set_xticks(range(mat.shape[1]))
    ax.set_yticks(range(mat.shape[0]))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"share of routed tokens per expert ({last_phase} phase)", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "tokens_per_expert.png")


def plot_waste(rows, out: Path) -> str | None:
    """Per MoE layer: the experts' diversity (mean pairwise cosine distance of their weights) and the gate's
    routing entropy (nats): copies under a uniform gate show 0 and log E, the waste of a soft phase."""
    pts = [r for r in rows if r.get("expert_diversity") is not None]
    if not pts:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, key, label in (
        (top, "expert_diversity_layers", "expert diversity"),
        (bottom, "entropy_layers", "routing entropy (nats)"),
    ):
        _shade_phases(ax, rows)
        series = [(r["step"], r[key]) for r in pts if r.get(key)]
        for layer in range(len(series[-1][1]) if series else 0):
            xy = [(s, v[layer]) for s, v in series if len(v) > layer]
            ax.plot(*zip(*xy), lw=1.2, label=f"MoE layer {layer}")
        ax.set_ylabel(label)
    bottom.set_xlabel("step")
    top.legend(fontsize=7, loc="upper left")
    return _save(fig, out / "diversity_entropy.png")


# eval.jsonl fields that are not a task metric of their own (or are plotted elsewhere)
NOT_TASK_METRICS = {"step", "phase", "flops", "tokens", "val_loss", "val_ppl", "experts_per_token"}


def plot_eval_metrics(rows, evals, out: Path) -> list[str]:
    """One plot per task metric of eval.jsonl (BLEU, chrF, masked accuracy, bits/byte, ...) against step."""
    keys = [k for k, v in evals[-1].items() if k not in NOT_TASK_METRICS and isinstance(v, (int, float))]
    names = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        _shade_phases(ax, rows)
        pts = [(e["step"], e[key]) for e in evals if isinstance(e.get(key), (int, float))]
        ax.plot(*zip(*pts), "o-", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend(fontsize=8, loc="best")
        names.append(_save(fig, out / f"{key}_vs_step.png"))
    return names


LAYER_PANELS = (
    ("k_mean", "experts per token (mean; band: +-std; dotted: max)"),
    ("chunk_sparsity", "chunk sparsity (8 tokens)"),
    ("load_cv", "load coefficient of variation"),
    ("dead_experts", "experts with no token"),
)


def plot_layers(rows, out: Path) -> str | None:
    """Per MoE layer over the steps: experts per token, chunk sparsity, load CV, experts without a token."""
    rows = [r for r in rows if r.get("layers") and r["layers"].get("k_mean")]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    n_layers = max(len(r["layers"]["k_mean"]) for r in rows)
    fig, axes = plt.subplots(len(LAYER_PANELS), 1, figsize=(7, 2.4 * len(LAYER_PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, LAYER_PANELS):
        _shade_phases(ax, rows)
        for layer in range(n_layers):
            get = lambda k: [r["layers"][k][layer] if layer < len(r["layers"][k]) else np.nan for r in rows]  # noqa: B023, E731
            (line,) = ax.plot(steps, get(key), lw=1.2, label=f"layer {layer}")
            if key == "k_mean":
                mean, std = np.array(get("k_mean")), np.array(get("k_std"))
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
                ax.plot(steps, get("k_max"), ":", color=line.get_color(), lw=1)
        ax.set_ylabel(key, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, loc="upper right", ncol=2)
    axes[-1].set_xlabel("step")
    return _save(fig, out / "routing_per_layer.png")


def eval_table(evals: list[dict]) -> list[str]:
    """Markdown rows of eval.jsonl: step, phase and whatever metrics the task wrote (scalars only)."""
    skip = {"step", "phase", "flops", "tokens"}
    keys = [k for k, v in evals[-1].items() if k not in skip and isinstance(v, (int, float))]
    lines = ["| step | phase | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for e in evals:
        cells = [f"{e[k]:.4f}" if isinstance(e.get(k), float) else str(e.get(k, "")) for k in keys]
        lines.append(f"| {e['step']} | {e['phase']} | " + " | ".join(cells) + " |")
    return lines


def write_report(out: Path, summary: dict) -> Path:
    rows, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    lines = ["# evomoe run report", ""]
    for k, v in summary.items():
        lines.append(f"- **{k}**: {v:.6g}" if isinstance(v, float) else f"- **{k}**: {v}")
    lines.append("")
    if rows:
        images = plot_loss(rows, evals, out)
        images.append(
            plot_series(rows, "experts_per_token", "experts per token", out, "experts_per_token.png")
        )
        images.append(plot_series(rows, "temperature", "gate temperature", out, "temperature.png"))
        waste = plot_waste(rows, out)
        if waste:
            images.append(waste)
        if evals:
            images += plot_eval_metrics(rows, evals, out)
        heat = plot_expert_load(rows, out)
        if heat:
            images.append(heat)
        per_layer = plot_layers(rows, out)
        if per_layer:
            images.append(per_layer)
        lines += [f"![{Path(n).stem}]({n})" for n in images]
        lines.append("")
    if evals:
        lines += eval_table(evals)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
