"""``evomoe compare``: EvoMoE against the routing baselines on the same model, data, budget and seeds.

Each (method, seed) trains in ``DIR/runs/<method>-s<seed>/``; a finished run (results.json present and its
config unchanged) is reused, an interrupted one resumes. ``compare.md`` / ``compare.json`` hold, per
method: final validation loss and perplexity (mean and spread over seeds), training FLOPs executed,
tokens/s, mean experts per token, dropped fraction, and the steps and FLOPs needed to reach the Switch
baseline's final validation loss.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
from pathlib import Path

from .config import (
    Config,
    ConfigError,
    apply_dict,
    apply_overrides,
    load_config,
    read_toml,
    split_overrides,
    to_toml,
)
from .errors import CLIError
from .train.metrics import read_jsonl

METHOD_DIR = Path(__file__).resolve().parent / "methods"
DEFAULT_METHODS = "dts,switch,gshard,base,hash,stablemoe,soft,dense"


def method_names() -> list[str]:
    """The methods shipped with the package: one TOML fragment each in ``evomoe/methods/``."""
    return sorted(p.stem for p in METHOD_DIR.glob("*.toml"))


def method_path(method: str) -> Path:
    """A shipped method by name, or a user's own fragment given as a path to a ``.toml`` file."""
    if method.endswith(".toml"):
        path = Path(method)
        if not path.is_file():
            raise ConfigError(f"--methods: method file '{method}' does not exist")
        return path
    path = METHOD_DIR / f"{method}.toml"
    if not path.is_file():
        names = ", ".join(method_names())
        raise ConfigError(
            f"--methods: unknown method '{method}' (choose from: {names}, or a path to a .toml file)"
        )
    return path


def method_label(method: str) -> str:
    return Path(method).stem if method.endswith(".toml") else method


def load_method(method: str) -> tuple[dict, str]:
    """(the fragment as a partial config, its description). A fragment is a config file that sets only the
    fields the method changes; its optional ``[method]`` table holds ``description``."""
    path = method_path(method)
    data = read_toml(path)
    info = data.pop("method", {})
    if not isinstance(info, dict) or set(info) - {"description"}:
        raise ConfigError(f"method file '{path}': [method] may only hold description")
    return data, str(info.get("description", ""))


def method_config(base: Config, method: str, seed: int) -> Config:
    """The base config with the method's fragment applied on top and the seed set; validated."""
    data, _ = load_method(method)
    cfg = _copy(base)
    try:
        apply_dict(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"method file '{method_path(method)}': {e}") from None
    return apply_overrides(cfg, [f"--train.seed={seed}"])


def _copy(cfg: Config) -> Config:
    return copy.deepcopy(cfg)


def run_one(cfg: Config, out: Path, log) -> dict:
    """Train one (method, seed) run, reusing a finished one with the same config."""
    from .train.run import run_training  # noqa: PLC0415

    results, saved = out / "results.json", out / "config.toml"
    if results.is_file() and saved.is_file():
        saved_cfg = load_config(str(saved), saved=True)
        if saved_cfg == _with_vocab(cfg, saved_cfg):
            log(f"reusing finished run {out}")
            return json.loads(results.read_text())
        raise ConfigError(f"'{out}' holds a run with another config: remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    summary = run_training(cfg, out, resume=True, env=os.environ, log=log, progress=False)
    if summary is None:
        raise CLIError(f"interrupted during '{out}' (checkpoint saved): rerun the same command to resume")
    return summary


def _with_vocab(cfg: Config, saved: Config) -> Config:
    """``cfg`` as it compares with a saved run: the resolved vocabulary, and the saved values of
    settings that do not change results (thread count, progress output)."""
    c = _copy(cfg)
    if c.model.vocab_size == 0:
        c.model.vocab_size = saved.model.vocab_size
    c.train.threads = saved.train.threads
    return c


def first_reach(evals: list[dict], target: float) -> tuple[int | None, float | None]:
    for e in evals:
        if e["val_loss"] <= target:
            return e["step"], e["flops"]
    return None, None


def run_stats(out: Path) -> dict:
    rows, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    steps = [r["step"] for r in rows]
    spans = [b - a for a, b in zip([0] + steps[:-1], steps)]
    wsum = lambda key: sum(r[key] * s for r, s in zip(rows, spans)) / max(sum(spans), 1)  # noqa: E731
    return {
        "experts_per_token": wsum("experts_per_token") if rows else 0.0,
        "dropped_fraction": wsum("dropped_fraction") if rows else 0.0,
        "evals": evals,
    }


def _mean_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: dict[str, list[dict]], target_method: str = "switch") -> dict:
    """Per-method means/spreads, and the steps/FLOPs to reach the target method's final val loss."""
    target = None
    if target_method in runs:
        target = statistics.fmean(r["val_loss"] for r in runs[target_method])
    table = {}
    for method, rs in runs.items():
        loss_m, loss_s = _mean_spread([r["val_loss"] for r in rs])
        reach = [first_reach(r["stats"]["evals"], target) for r in rs] if target is not None else []
        reached = [x for x in reach if x[0] is not None]
        table[method] = {
            "seeds": [r["seed"] for r in rs],
            "val_loss": loss_m,
            "val_loss_std": loss_s,
            "val_ppl": math.exp(loss_m),
            "val_ppl_std": statistics.stdev([r["val_ppl"] for r in rs]) if len(rs) > 1 else 0.0,
            "train_flops": statistics.fmean(r["train_flops"] for r in rs),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rs),
            "experts_per_token": statistics.fmean(r["stats"]["experts_per_token"] for r in rs),
            "dropped_fraction": statistics.fmean(r["stats"]["dropped_fraction"] for r in rs),
            "reached": f"{len(reached)}/{len(rs)}",
            "steps_to_target": statistics.fmean(x[0] for x in reached)
            if len(reached) == len(rs) and rs
            else None,
            "flops_to_target": statistics.fmean(x[1] for x in reached)
            if len(reached) == len(rs) and rs
            else None,
        }
    return {"target_method": target_method, "target_val_loss": target, "methods": table}


def _fmt(x, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def write_markdown(summary: dict, out: Path, command: str) -> Path:
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
    for m, r in summary["methods"].items():
        lines.append(
            f"| {m} | {len(r['seeds'])} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_ppl']:.2f} "
            f"| {r['train_flops']:.3g} "
            f"| {r['tokens_per_s']:,.0f} | {r['experts_per_token']:.2f} | {r['dropped_fraction']:.3f} "
            f"| {_fmt(r['steps_to_target'], '.0f')} ({r['reached']}) | {_fmt(r['flops_to_target'], '.3g')} |"
        )
    lines += [
        "",
        "![validation loss vs step](val_loss_vs_step.png)",
        "",
        "![validation loss vs FLOPs](val_loss_vs_flops.png)",
    ]
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_curves(runs: dict[str, list[dict]], out: Path) -> None:
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
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (mean over seeds)")
        if key == "flops":
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def cmd_compare(args, extra: list[str]) -> int:
    base = load_config(args.config or "default", split_overrides(extra))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_config(base, m, base.train.seed)  # every method checked before the first run starts
    if args.seeds < 1:
        raise ConfigError(f"--seeds = {args.seeds}: must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config.toml").write_text(to_toml(base), encoding="utf-8")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    runs: dict[str, list[dict]] = {}
    for method in methods:
        for i in range(args.seeds):
            seed = base.train.seed + i
            cfg = method_config(base, method, seed)
            run_dir = out / "runs" / f"{method_label(method)}-s{seed}"
            log(f"== {method} seed {seed} -> {run_dir}")
            summary = run_one(cfg, run_dir, log)
            summary["stats"] = run_stats(run_dir)
            summary["seed"] = seed
            runs.setdefault(method_label(method), []).append(summary)
    summary = aggregate(runs)
    command = "evomoe compare " + " ".join(sys.argv[2:]) if args.command_line is None else args.command_line
    (out / "compare.json").write_text(json.dumps({"command": command, **summary}, indent=1) + "\n")
    plot_curves(runs, out)
    md = write_markdown(summary, out, command)
    print(md.read_text())
    print(f"written: {md} and {out / 'compare.json'}")
    return 0


def add_compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare", help="train EvoMoE and the baselines with the same budget; write compare.md"
    )
    c.add_argument("config", nargs="?", help="a TOML file or a preset name (default: default)")
    c.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated method names (evomoe/methods/*.toml) or paths to your own method .toml files "
        f"(default: {DEFAULT_METHODS})",
    )
    c.add_argument("--seeds", type=int, default=1, help="seeds per method (train.seed, train.seed+1, ...)")
    c.add_argument("--out", required=True, help="directory for the runs, compare.md and compare.json")
    c.set_defaults(command_line=None)
