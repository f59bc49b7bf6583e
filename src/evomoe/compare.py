"""``evomoe compare``: EvoMoE against the routing baselines on the same model, data, budget and seeds.

Each (method, seed) trains in ``DIR/runs/<method>-s<seed>/``; a finished run (results.json present and its
config unchanged) is reused, an interrupted one resumes. ``compare.md`` / ``compare.json`` hold, per
method: final validation loss and perplexity (mean and spread over seeds), training FLOPs executed,
tokens/s, mean experts per token, dropped fraction, and the steps and FLOPs needed to reach the Switch
baseline's final validation loss. Beside them, the budget table compares every method at equal steps and at
equal FLOPs executed (each run's validation curve read at the largest step count and the largest FLOPs
every run reached, linearly between evaluations). ``--flops X`` gives every method the same training
FLOPs budget (``train.max_flops``; ``train.steps`` stays a cap, which must be high enough for the cheapest
method: a run the cap stopped short of its budget is marked). A target check of one method (``--candidate``)
ends ``compare.md`` (``verdict.py``); ``--tabulate-only`` writes the tables from the finished runs alone.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
from pathlib import Path

from .compare_report import plot_curves, write_markdown
from .config import (
    Config,
    ConfigError,
    apply_dict,
    apply_overrides,
    config_help,
    load_config,
    read_toml,
    split_overrides,
    to_toml,
)
from .errors import CLIError
from .train.metrics import read_jsonl
from .verdict import target_check

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
    diversity = [r["expert_diversity"] for r in rows if r.get("expert_diversity") is not None]
    return {
        "experts_per_token": wsum("experts_per_token") if rows else 0.0,
        "dropped_fraction": wsum("dropped_fraction") if rows else 0.0,
        "entropy": wsum("entropy") if rows and all("entropy" in r for r in rows) else 0.0,
        "expert_diversity": diversity[-1] if diversity else None,
        "evals": evals,
    }


def value_at(evals: list[dict], key: str, x: float) -> float | None:
    """The validation loss at ``key`` (step or flops) = x, linearly between the two evaluations around it;
    None when x lies outside the evaluated range."""
    pts = [(e[key], e["val_loss"]) for e in evals]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if pts and pts[-1][0] == x else None


def equal_budgets(runs: dict[str, list[dict]], max_flops: float = 0.0) -> dict:
    """Every method's validation loss at the largest step count and at the largest FLOPs all runs reached."""
    finals = [r["stats"]["evals"][-1] for rs in runs.values() for r in rs if r["stats"]["evals"]]
    if not finals:
        return {"steps": None, "flops": None, "methods": {}}
    steps, flops = min(e["step"] for e in finals), min(e["flops"] for e in finals)
    table = {}
    for method, rs in runs.items():
        at_steps = [value_at(r["stats"]["evals"], "step", steps) for r in rs]
        at_flops = [value_at(r["stats"]["evals"], "flops", flops) for r in rs]
        div = [r["stats"].get("expert_diversity") for r in rs]
        table[method] = {
            "loss_at_steps": _mean_spread(at_steps) if None not in at_steps else None,
            "loss_at_flops": _mean_spread(at_flops) if None not in at_flops else None,
            "final_steps": statistics.fmean(r["steps"] for r in rs),
            "final_flops": statistics.fmean(r["train_flops"] for r in rs),
            "short_of_budget": sum(1 for r in rs if 0 < max_flops > r["train_flops"]),
            "entropy": statistics.fmean(r["stats"].get("entropy", 0.0) for r in rs),
            "expert_diversity": statistics.fmean(div) if None not in div else None,
        }
    return {"steps": steps, "flops": flops, "max_flops": max_flops, "methods": table}


def _mean_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def task_metrics(runs: dict[str, list[dict]]) -> list[str]:
    """The task's own final metrics every run reports (BLEU, chrF, masked accuracy, ...), beyond the loss."""
    skip = {"val_loss", "val_ppl", "train_flops", "tokens", "train_seconds", "tokens_per_s", "skipped_steps",
            "seed", "steps"}  # fmt: skip
    all_runs = [r for rs in runs.values() for r in rs]
    keys = [k for k, v in all_runs[0].items() if k not in skip and isinstance(v, float)] if all_runs else []
    return [k for k in keys if all(isinstance(r.get(k), float) for r in all_runs)]


def aggregate(runs: dict[str, list[dict]], target_method: str = "switch") -> dict:
    """Per-method means/spreads, and the steps/FLOPs to reach the target method's final val loss."""
    target = None
    if target_method in runs:
        target = statistics.fmean(r["val_loss"] for r in runs[target_method])
    table = {}
    extra = task_metrics(runs)
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
            "metrics": {k: _mean_spread([r[k] for r in rs]) for k in extra},
        }
    return {"target_method": target_method, "target_val_loss": target, "methods": table}


def cmd_compare(args, extra: list[str]) -> int:
    """One budget (``--flops X`` or none); several budgets go through ``crossover.cmd_compare_budgets``."""
    budget = [] if args.flops is None else [f"--train.max_flops={args.flops}"]
    base = load_config(args.config or "default", split_overrides(extra) + budget)
    methods = check_methods(base, args)
    command = "evomoe compare " + " ".join(sys.argv[2:]) if args.command_line is None else args.command_line
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    compare_methods(base, methods, args, out, command, log)
    print((out / "compare.md").read_text())
    print(f"written: {out / 'compare.md'} and {out / 'compare.json'}")
    return 0


def check_methods(base: Config, args) -> list[str]:
    """The method list of ``--methods``, every method's config checked before the first run starts."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_config(base, m, base.train.seed)
    if args.candidate is not None and args.candidate not in [method_label(m) for m in methods]:
        raise ConfigError(f"--candidate = '{args.candidate}': not one of --methods ({args.methods})")
    if args.seeds < 1:
        raise ConfigError(f"--seeds = {args.seeds}: must be >= 1")
    return methods


def compare_methods(
    base: Config, methods: list[str], args, out: Path, command: str, log
) -> tuple[dict, dict]:
    """Train (or reuse) every (method, seed) run of one budget in ``out``; write compare.md/.json and the
    plots. Returns (the compare.json record, method -> that method's run summaries)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config.toml").write_text(to_toml(base), encoding="utf-8")
    runs: dict[str, list[dict]] = {}
    for method in methods:
        for i in range(args.seeds):
            seed = base.train.seed + i
            cfg = method_config(base, method, seed)
            run_dir = out / "runs" / f"{method_label(method)}-s{seed}"
            if args.tabulate_only and not (run_dir / "results.json").is_file():
                log(f"== {method} seed {seed}: no finished run in {run_dir}, left out (--tabulate-only)")
                continue
            log(f"== {method} seed {seed} -> {run_dir}")
            summary = run_one(cfg, run_dir, log)
            summary["stats"] = run_stats(run_dir)
            summary["seed"] = seed
            runs.setdefault(method_label(method), []).append(summary)
    if not runs:
        raise CLIError(f"--tabulate-only: no finished run of {args.methods} in '{out}'")
    summary = aggregate(runs)
    budgets = equal_budgets(runs, base.train.max_flops)
    check = target_check(summary, budgets, method_label(args.candidate or methods[0]), runs=runs)
    record = {"command": command, **summary, "budgets": budgets, "target_check": check}
    (out / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curves(runs, out, budgets)
    write_markdown(summary, out, command, budgets, check)
    return record, runs


def add_compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare", help="train EvoMoE and the baselines with the same budget; write compare.md"
    )
    c.add_argument("config", nargs="?", help=f"{config_help()} (default: default)")
    c.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated method names (evomoe/methods/*.toml) or paths to your own method .toml files "
        f"(default: {DEFAULT_METHODS})",
    )
    c.add_argument(
        "--candidate",
        default=None,
        help="the method the target check judges against Switch and every other method (default: the first)",
    )
    c.add_argument(
        "--tabulate-only",
        action="store_true",
        help="train nothing: write the tables from the finished runs in --out (a comparison still growing)",
    )
    c.add_argument("--seeds", type=int, default=1, help="seeds per method (train.seed, train.seed+1, ...)")
    c.add_argument("--out", required=True, help="directory for the runs, compare.md and compare.json")
    c.add_argument(
        "--flops",
        default=None,
        help="the same training FLOPs budget for every method (train.max_flops; train.steps stays a cap); "
        "several, comma-separated (4e12,1.6e13,5e13): every method at each budget in DIR/flops-<budget>/, "
        "and crossover.md with validation loss and (MoE - dense) vs FLOPs",
    )
    c.set_defaults(command_line=None)
