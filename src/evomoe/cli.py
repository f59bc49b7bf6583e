# Command line: evomoe train | eval | compare | sweep | config | export | generate.
# The only module that reads argv and the environment (the parsers of compare and sweep live beside them).
from __future__ import annotations

import os

# Before torch is imported: idle OpenMP threads sleep instead of spinning. On a shared CPU, spinning
# threads made each small op of the MoE layer cost milliseconds (docs/performance.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import sys
from pathlib import Path

from .config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_help,
    load_config,
    split_overrides,
    to_dict,
    to_toml,
)
from .errors import CLIError
from .parallel.env import world_info
from .registry import load_user_plugins

# fields that may change when a run is resumed; everything else must match the saved config
RESUME_MUTABLE = {
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.device",
    "train.threads",
    "train.max_skipped_steps",
    "parallel.ep",  # checkpoints store experts by global id: a run may resume on another layout
    "parallel.dp_shard",
    "task.mt.eval_sentences",  # how many validation sentences an evaluation decodes: not training
}
EVAL_MUTABLE = {
    "train.eval_batches",
    "train.device",
    "train.threads",
    "train.batch_size",
    "task.mt.eval_sentences",
}
RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "eval.jsonl",
    "checkpoints",
    "report.md",
    "results.json",
    "tokenizer.json",
    "source_model.json",
    "tensorboard",
    "translations",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_compatible(saved: Config, new: Config) -> None:
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    for key in a:
        if key == "model.vocab_size" and b[key] == 0:
            continue
        if a[key] != b[key] and key not in RESUME_MUTABLE:
            raise ConfigError(
                f"{key} = {b[key]!r} differs from the run being resumed ({a[key]!r}); only "
                f"{', '.join(sorted(RESUME_MUTABLE))} may change on --resume (or start a new --out)"
            )


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; make sure it can be written before any work starts.

    The check leaves no trace: directories it had to create for the probe are removed again, and the run
    creates ``out`` when it writes its first file (``run_training``), so a run that fails while loading its
    data or building its model leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out '{out}' exists and is not a directory")
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not resume and not overwrite:
        raise CLIError(
            f"--out '{out}' already holds a run ({', '.join(existing)}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another directory"
        )
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"--out '{out}' is not writable: {e.strerror or e}") from None
    finally:
        for p in created:
            try:
                p.rmdir()
            except FileNotFoundError:  # the probe failed before creating it
                continue
            except OSError:
                break
    if overwrite and not resume:
        for n in existing:
            p = out / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def cmd_train(args, extra: list[str]) -> int:
    from .train.run import run_training  # noqa: PLC0415

    out = Path(args.out)
    overrides = split_overrides(extra)
    saved_cfg_path = out / "config.toml"
    if args.resume and saved_cfg_path.is_file():
        saved = load_config(str(saved_cfg_path), saved=True)
        cfg = (
            load_config(args.config or str(saved_cfg_path), overrides, saved=not args.config)
            if (args.config or overrides)
            else saved
        )
        check_resume_compatible(saved, cfg)
    else:
        cfg = load_config(args.config or "default", overrides)
    if cfg.model.init_from:  # the model's shape from its directory, before comparing with a saved run
        from .train.pretrained import resolve_pretrained  # noqa: PLC0415

        resolve_pretrained(cfg)
        if args.resume and saved_cfg_path.is_file():
            check_resume_compatible(load_config(str(saved_cfg_path)), cfg)
    if world_info(os.environ).distributed:  # launched by torchrun
        return train_distributed(args, cfg, out)
    prepare_out_dir(out, args.resume, args.overwrite)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    summary = run_training(cfg, out, args.resume, os.environ, log, progress=not args.no_progress)
    return print_summary(summary, out)


def print_summary(summary: dict | None, out: Path) -> int:
    if summary is None:
        return 130
    print(
        f"done: {summary['steps']} steps, {summary['headline']}, {summary['train_seconds']:.0f} s training\n"
        f"results: {out / 'results.json'}\nreport: {summary['report']}"
    )
    return 0


def train_distributed(args, cfg: Config, out: Path) -> int:
    """Under torchrun: every rank computes its share of each step; rank 0 prepares --out and writes every file
    (config, metrics, eval, checkpoints, results, report), the other ranks write nothing."""
    from .parallel.env import broadcast_from_main, distributed_session  # noqa: PLC0415
    from .train.run import run_training  # noqa: PLC0415

    with distributed_session(os.environ) as info:
        error = None
        if info.rank == 0:
            try:
                prepare_out_dir(out, args.resume, args.overwrite)
            except (CLIError, OSError) as e:
                error = str(e)
        error = broadcast_from_main(error)
        if error is not None:
            if info.rank == 0:
                raise CLIError(error)
            return 2
        if info.rank == 0:
            log = lambda s: print(s, file=sys.stderr)  # noqa: E731
            summary = run_training(cfg, out, args.resume, os.environ, log, progress=not args.no_progress)
            return print_summary(summary, out)
        return train_worker(cfg, out, args.resume)


def train_worker(cfg: Config, out: Path, resume: bool) -> int:
    """A rank other than 0: the collective part of ``run_training`` (restore, steps, final evaluation)."""
    from .train.trainer import Trainer, resumable_checkpoint  # noqa: PLC0415

    quiet = lambda s: None  # noqa: E731 - rank 0 reports; errors still raise on every rank
    trainer = Trainer(cfg, out, env=os.environ, log=quiet, progress=False)
    path = resumable_checkpoint(out, log=quiet) if resume else None
    if path is not None:
        trainer.restore(path)
    result = trainer.run()
    if result["stopped"]:
        return 130
    if result["eval"] is None:
        trainer.evaluate()
    return 0


def cmd_eval(args, extra: list[str]) -> int:
    from .train import checkpoint as ckpt  # noqa: PLC0415
    from .train.trainer import Trainer  # noqa: PLC0415

    path = Path(args.checkpoint)
    if (path / "checkpoints").is_dir():
        found = ckpt.find_good_checkpoint(path / "checkpoints", log=lambda s: print(s, file=sys.stderr))
        if found is None:
            raise CLIError(f"no complete checkpoint under '{path}/checkpoints'")
        path = found
    ckpt.verify_checkpoint(path)
    state = ckpt.load_trainer_state(path)
    overrides = split_overrides(extra)
    for o in overrides:
        if o.lstrip("-").split("=")[0] not in EVAL_MUTABLE:
            raise ConfigError(f"'{o}': eval accepts only {', '.join(sorted(EVAL_MUTABLE))}")
    cfg = apply_overrides(config_from_dict(state["config"]), overrides)
    if world_info(os.environ).distributed:
        raise CLIError("evomoe eval runs in one process (a checkpoint holds all experts): without torchrun")
    cfg.parallel.ep = 1  # a checkpoint written with expert parallelism holds every expert by global id
    trainer = Trainer(
        cfg, path.parent.parent, env=os.environ, log=lambda s: print(s, file=sys.stderr), progress=False
    )
    trainer.restore(path, truncate_logs=False)
    result = trainer.evaluate()
    print(json.dumps(result, indent=1))
    return 0


def cmd_export(args, extra: list[str]) -> int:
    from .models.hf.export import ExportError, plan_export, write_export  # noqa: PLC0415
    from .models.hf.write import check_target  # noqa: PLC0415
    from .train.load_run import find_checkpoint, load_run  # noqa: PLC0415

    if extra:
        raise CLIError(f"unexpected arguments: {' '.join(extra)}")
    out, ck = Path(args.out), find_checkpoint(args.run)
    try:
        check_target(out, args.overwrite, keep=ck)  # before the run is loaded
    except ExportError as e:
        raise CLIError(str(e)) from None
    run = load_run(ck)
    try:
        plan = plan_export(run.model, run.hard, run.source, run.tokenizer)
    except ExportError as e:
        raise CLIError(f"cannot export '{ck}' (step {run.step}, phase {run.phase}): {e}") from None
    hf_json = getattr(run.tokenizer, "hf_json", None)
    if hf_json is None:
        print("warning: the run has no tokenizer.json: exported without a tokenizer", file=sys.stderr)
    write_export(plan, out, hf_json() if hf_json else None, overwrite=args.overwrite)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    kind = run.phase if run.model.spawned else "dense"
    print(f"exported step {run.step} ({kind}) as {plan.model_type} ({plan.auto_class}) to {out}")
    return 0


def cmd_generate(args, extra: list[str]) -> int:
    from .generate import Options, check_options, run_prompt  # noqa: PLC0415
    from .train.load_run import load_run  # noqa: PLC0415

    if extra:
        raise CLIError(f"unexpected arguments: {' '.join(extra)}")
    opts = Options(
        args.max_new_tokens, args.temperature, args.top_k, args.seed, args.beam, args.length_penalty
    )
    try:
        check_options(opts)  # before anything is loaded
        run = load_run(args.run)
        if run.tokenizer is None:
            raise CLIError(f"'{args.run}' has no tokenizer.json: cannot encode the prompt")
        out = run_prompt(run, args.prompt, opts)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps({"prompt_ids": out.prompt_ids, "new_ids": out.new_ids}) if args.ids else out.text)
    return 0


def add_inference_parsers(sub) -> None:
    x = sub.add_parser("export", help="write a run as a Hugging Face model directory (transformers loads it)")
    x.add_argument("run", help="a run directory (its newest good checkpoint) or a checkpoint directory")
    x.add_argument("--out", required=True, help="the directory to write (absent or empty)")
    x.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is not empty (all of it, at once)"
    )
    g = sub.add_parser(
        "generate",
        help="a run's model on a prompt: a language model continues it, a translation run translates it, a "
        "masked LM fills its <mask> tokens",
    )
    g.add_argument("run", help="a run directory (its newest good checkpoint) or a checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--max-new-tokens", type=int, help="LM: tokens to add (default 64); MT: the longest translation"
    )
    g.add_argument("--temperature", type=float, help="0: greedy / argmax (default: LM 0.8, masked LM 0)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely (default 0: all)")
    g.add_argument("--seed", type=int, help="of the sampling (default 0)")
    g.add_argument("--beam", type=int, help="MT: beam width, 1 = greedy (default: the run's task.mt.beam)")
    g.add_argument(
        "--length-penalty", type=float, help="MT: beam score / length ** this (default: the run's)"
    )
    g.add_argument("--ids", action="store_true", help="print the token ids as JSON instead of the text")


DESCRIPTION = (
    "Train Mixture-of-Experts models the EvoMoE way (one expert, then diverse experts spawned from it, then "
    "a dense-to-sparse gate), compare routers, evaluate, export to Hugging Face transformers, generate."
)
EPILOG = (
    "'evomoe COMMAND --help' lists a command's options. A config is a TOML file or a preset; any field can "
    "be overridden with --section.field=value; 'evomoe config PRESET' prints every field."
)


def cmd_config(args, extra: list[str]) -> int:
    """Print the resolved config: every field of every table, as TOML that loads back to an equal config."""
    overrides = split_overrides(extra)
    cfg = load_config(args.config, overrides)
    if cfg.model.init_from:  # the model's shape from its directory, as training would resolve it
        from .train.pretrained import resolve_pretrained  # noqa: PLC0415

        resolve_pretrained(cfg)
    command = " ".join(["evomoe config", args.config, *overrides])
    print(f"# {command}\n# every field; '# default: ...' marks a value that differs from the default\n")
    print(to_toml(cfg, Config()), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evomoe", description=DESCRIPTION, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model; extra --section.field=value flags override the config")
    t.add_argument(
        "config", nargs="?", help=f"{config_help()} (default: default; see every field: evomoe config PRESET)"
    )
    t.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints, report)")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest good checkpoint"
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser(
        "eval", help="evaluate a checkpoint (or a run directory's latest) on the validation split"
    )
    e.add_argument("checkpoint")
    c = sub.add_parser(
        "config", help="print a config with every field and its value (TOML); --section.field=value overrides"
    )
    c.add_argument("config", help=config_help())
    from .compare import add_compare_parser  # noqa: PLC0415
    from .sweep import add_sweep_parser  # noqa: PLC0415

    add_compare_parser(sub)
    add_sweep_parser(sub)
    add_inference_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:  # a user's own routers, tasks, models (docs/extending.md)
        load_user_plugins(os.environ.get("EVOMOE_PLUGINS", ""))
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handlers = {"train": cmd_train, "eval": cmd_eval, "config": cmd_config}
    handlers.update(export=cmd_export, generate=cmd_generate)
    if args.command in ("compare", "sweep"):
        from .crossover import cmd_compare_budgets  # noqa: PLC0415
        from .sweep import cmd_sweep  # noqa: PLC0415

        handlers.update(compare=cmd_compare_budgets, sweep=cmd_sweep)
    from .train.checkpoint import CheckpointError  # noqa: PLC0415
    from .train.trainer import TrainingError  # noqa: PLC0415

    try:
        return handlers[args.command](args, extra)
    except (ConfigError, CLIError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}; files already written are kept", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
