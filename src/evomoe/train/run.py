"""One training run in a directory, start to finish: the shared core of ``evomoe train`` and ``compare``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import Config, ConfigError, to_toml
from ..data.tokenizer import TOKENIZER_FILE
from ..models.hf.config import SOURCE_FILE, source_model
from .checkpoint import write_bytes_atomic
from .metrics import truncate_jsonl
from .trainer import Trainer, resumable_checkpoint

DATA_FILE = "data.json"
IDENTITY = ("content_sha256", "tokens", "tokenizer_sha256")  # equal exactly when the tokens are equal


def check_data(path: Path, data: dict | None, resumed: bool) -> None:
    """Write the training text's identity into the run directory (``data.json``); a resumed run whose
    text differs from the one it was trained on stops with an error naming both (nothing is written)."""
    if data is None:
        return
    if resumed and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"'{path}' is unreadable ({e}); delete it to accept the current data") from None
        if any(before.get(k) != data.get(k) for k in IDENTITY):
            raise ConfigError(
                f"data.corpus = {data['corpus']!r}: this run was trained on other text than the corpus gives "
                f"now ({_identity(before)} then, {_identity(data)} now); resuming would silently change the "
                f"data. Restore the corpus (e.g. the pinned package versions), or start a new run directory"
            )
    write_bytes_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _identity(d: dict) -> str:
    pk = ", ".join(f"{p['name']} {p['version']}" for p in d.get("packages") or [])
    sha = str(d.get("content_sha256"))[:12]
    return f"content {sha}, {d.get('tokens')} tokens" + (f", packages {pk}" if pk else "")


def run_training(
    cfg: Config,
    out: Path,
    resume: bool,
    env: Mapping[str, str],
    log: Callable[[str], None],
    progress: bool = True,
    data=None,
) -> dict | None:
    """Train (or continue) the run in ``out``; return its summary, or None when stopped by a signal."""
    trainer = Trainer(cfg, out, env=env, log=log, progress=progress, data=data)
    path = resumable_checkpoint(out, log=log) if resume else None
    if path is not None:
        trainer.restore(path)
        log(f"resuming from {path} (step {trainer.state.step})")
    elif resume:
        log(f"no checkpoint in '{out}/checkpoints': starting a new run")
        for name in ("metrics.jsonl", "eval.jsonl"):  # rows of a run killed before its first checkpoint
            truncate_jsonl(out / name, 0)
    out.mkdir(parents=True, exist_ok=True)  # first here: a run that failed to start leaves no directory
    check_data(out / DATA_FILE, trainer.task.provenance(), resumed=path is not None)
    # atomic: a kill while a resumed run rewrites config.toml must not leave a torn file behind
    write_bytes_atomic(out / "config.toml", to_toml(cfg).encode("utf-8"))
    # the run's tokenizer (tasks with one), for ``evomoe generate`` and ``evomoe export``
    task = trainer.task  # the task's own tokenizer (with its special tokens), else its data's
    tokenizer = getattr(task, "tokenizer", None) or getattr(getattr(task, "data", None), "tokenizer", None)
    if tokenizer is not None:
        write_bytes_atomic(out / TOKENIZER_FILE, tokenizer.to_json().encode("utf-8"))
    if cfg.model.init_from:  # the source's special ids and context, for ``evomoe export``
        source = json.dumps(source_model(cfg.model.init_from), indent=1) + "\n"
        write_bytes_atomic(out / SOURCE_FILE, source.encode("utf-8"))
    result = trainer.run()
    if result["stopped"]:
        return None
    final = result["eval"] or trainer.evaluate()
    summary = {
        "task": cfg.task.name,
        "router": cfg.router.name if cfg.moe.enabled else "dense",
        "seed": cfg.train.seed,
        "steps": trainer.state.step,
        **{k: final[k] for k in trainer.task.metric_names if k in final},  # MT without decoding: no BLEU
        "train_flops": trainer.state.flops,
        "tokens": trainer.state.tokens,
        "passes": trainer.task.passes(trainer.state.tokens),
        "train_seconds": trainer.state.train_seconds,
        "tokens_per_s": trainer.state.tokens / max(trainer.state.train_seconds, 1e-9),
        "skipped_steps": trainer.state.skipped_total,
        "headline": trainer.task.summary(final),
    }
    write_bytes_atomic(out / "results.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    from .report import write_report  # noqa: PLC0415 - matplotlib only once training is done (fast start)

    summary["report"] = str(write_report(out, summary))
    return summary
