"""``evomoe sweep``: vary one config field at a time around a base config and tabulate the outcome.

``evomoe sweep default --vary gate.tau_min=0.3,0.5 --vary evolve.spawn=copy,mask --seeds 2 --out DIR``
trains the base config and every one-field variant (same data, budget and seeds), reusing finished
runs, and writes ``sweep.md`` / ``sweep.json``: final validation loss (mean and spread over seeds),
training FLOPs executed, mean experts per token, and the steps each variant needed to reach the base
config's final validation loss.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

from .compare import first_reach, run_one, run_stats
from .config import (
    ConfigError,
    apply_overrides,
    config_help,
    load_config,
    parse_override,
    split_overrides,
    to_toml,
)


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """``field=v1,v2`` -> (field, ["v1", "v2"]); each value is validated later through the config."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--vary '{item}' must look like section.field=value1,value2")
        key, values = item.split("=", 1)
        parse_override(f"{key}=0")  # key shape check
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--vary '{item}': no values")
        out.append((key, vals))
    return out


def variants(base, vary: list[tuple[str, list[str]]]) -> list[tuple[str, object]]:
    """The base config and every one-field variant that differs from it."""
    result = [("base", base)]
    for key, vals in vary:
        for v in vals:
            cfg = apply_overrides(copy.deepcopy(base), [f"--{key}={v}"])
            if cfg != base:
                result.append((f"{key}={v}", cfg))
    return result


def run_name(variant: str) -> str:
    """A directory name for a variant that does not depend on its position in the sweep."""
    return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in variant)


def cmd_sweep(args, extra: list[str]) -> int:
    base = load_config(args.config or "default", split_overrides(extra))
    vary = parse_vary(args.vary or [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config.toml").write_text(to_toml(base), encoding="utf-8")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows: dict[str, list[dict]] = {}
    todo = variants(base, vary)
    for idx, (name, cfg) in enumerate(todo):
        for i in range(args.seeds):
            c = apply_overrides(copy.deepcopy(cfg), [f"--train.seed={base.train.seed + i}"])
            run_dir = out / "runs" / f"{run_name(name)}-s{c.train.seed}"
            log(f"== [{idx + 1}/{len(todo)}] {name} seed {c.train.seed} -> {run_dir}")
            summary = run_one(c, run_dir, log)
            summary["stats"] = run_stats(run_dir)
            rows.setdefault(name, []).append(summary)
    target = statistics.fmean(r["val_loss"] for r in rows["base"])
    table = {}
    for name, rs in rows.items():
        losses = [r["val_loss"] for r in rs]
        reach = [first_reach(r["stats"]["evals"], target) for r in rs]
        table[name] = {
            "val_loss": statistics.fmean(losses),
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "train_flops": statistics.fmean(r["train_flops"] for r in rs),
            "experts_per_token": statistics.fmean(r["stats"]["experts_per_token"] for r in rs),
            "steps_to_base": (
                statistics.fmean(x[0] for x in reach) if all(x[0] is not None for x in reach) else None
            ),
        }
    command = "evomoe sweep " + " ".join(sys.argv[2:])
    (out / "sweep.json").write_text(
        json.dumps({"command": command, "base_val_loss": target, "variants": table}, indent=1)
    )
    lines = [
        "# evomoe sweep",
        "",
        f"Command: `{command}`",
        "",
        "| variant | val loss (mean ± std) | Δ vs base | train FLOPs | experts/token | steps to base loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in sorted(table.items(), key=lambda kv: kv[1]["val_loss"]):
        steps = "not reached" if r["steps_to_base"] is None else f"{r['steps_to_base']:.0f}"
        lines.append(
            f"| {name} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_loss'] - target:+.4f} "
            f"| {r['train_flops']:.3g} | {r['experts_per_token']:.2f} | {steps} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="vary config fields one at a time around a base config; write sweep.md")
    s.add_argument("config", nargs="?", help=f"{config_help()} (default: default)")
    s.add_argument("--vary", action="append", help="section.field=v1,v2 (repeatable)")
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--out", required=True)
