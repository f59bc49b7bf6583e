"""A finished (or running) run's model for inference: the latest good checkpoint, its config, the gate's
phase and schedule values at that step (what evaluation routes with), the run's tokenizer
(``RUN/tokenizer.json``) and, for an imported model, what it came from (``RUN/source_model.json``). Used by
``export`` and ``generate``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, config_from_dict
from ..data.tokenizer import SpecialTokens, Tokenizer, load_tokenizer
from ..evolve import spawn_model
from ..models.hf.config import SOURCE_FILE, source_model
from ..moe.router import GateState
from ..registry import ROUTERS
from ..schedule import Schedules
from . import checkpoint as ckpt
from .trainer import model_class


@dataclass
class LoadedRun:
    model: torch.nn.Module  # the run's model, in eval mode, on the CPU
    cfg: Config
    step: int
    phase: str  # diversify | sparsify | sparse at the checkpoint's last step
    hard: bool  # the DTS gate had switched to hard top-1
    tokenizer: Tokenizer | None
    checkpoint: Path
    gate: GateState  # the schedule values of the checkpoint's last step, as the run's evaluation used them
    source: dict | None = None  # ``source_model(model.init_from)`` of an imported model, else None

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent


RUN_MARKERS = ("config.toml", "metrics.jsonl", "checkpoints")  # files every run directory starts with


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest good checkpoint."""
    path = Path(path)
    if any((path / n).exists() for n in RUN_MARKERS):
        if not ckpt.checkpoint_candidates(path / "checkpoints"):
            raise ckpt.CheckpointError(
                f"no checkpoint yet in '{path}': a run writes its first after train.ckpt_every steps "
                "(and when it ends or is stopped with Ctrl-C)"
            )
        found = ckpt.find_good_checkpoint(path / "checkpoints", log=lambda s: None)
        if found is None:
            raise ckpt.CheckpointError(f"no complete checkpoint under '{path}/checkpoints'")
        return found
    if not (path / "trainer.pt").is_file():
        raise ckpt.CheckpointError(f"'{path}' is neither a run directory nor a checkpoint")
    return path


def gate_at(state: dict) -> GateState:
    """The gate of the checkpoint's last step (the trainer's ``gate_state`` at evaluation)."""
    s = Schedules.from_state_dict(state["schedules"])
    last, flops = max(int(state["step"]) - 1, 0), float(state.get("run", {}).get("flops", 0.0))
    hard = s.phases.phase(last) == "sparse"
    return GateState(
        s.tau(last, flops), hard, last, s.phases.spawn_step, s.total_steps, s.tau.progress(last, flops)
    )


def read_source(run_dir: Path, init_from: str) -> dict | None:
    """What an imported model came from: the run's record, or (runs older than it) the directory itself."""
    if (run_dir / SOURCE_FILE).is_file():
        return json.loads((run_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    if init_from and (Path(init_from) / "config.json").is_file():
        return source_model(init_from)
    return None


def load_run(path: str | Path) -> LoadedRun:
    ck = find_checkpoint(path)
    ckpt.verify_checkpoint(ck)
    state = ckpt.load_trainer_state(ck)
    cfg = config_from_dict(state["config"])
    init_from = cfg.model.init_from
    cfg.model.init_from = ""  # the checkpoint holds every weight: the source directory is not needed
    cfg.parallel.ep = 1
    model = model_class(cfg)(cfg.model, cfg.moe)
    if state["spawned"]:
        info = {"vocab_size": cfg.model.vocab_size}
        if "token_counts" in ROUTERS.get(cfg.router.name).needs:  # what they build is in the checkpoint
            info["token_counts"] = torch.ones(cfg.model.vocab_size, dtype=torch.long)
        spawn_model(model, cfg, torch.Generator().manual_seed(0), **info)
    ckpt.load_weights(model, ck)
    schedules = Schedules.from_state_dict(state["schedules"])
    phase = schedules.phases.phase(max(int(state["step"]) - 1, 0))
    run_dir = ck.parent.parent
    try:
        tok = load_tokenizer(run_dir)
    except ValueError:
        tok = None
    if tok is not None and not isinstance(tok, SpecialTokens) and cfg.model.vocab_size == tok.vocab_size + 4:
        tok = SpecialTokens(tok)  # a masked-LM run that saved its base tokenizer (before the specials were)
    source = read_source(run_dir, init_from)
    step = int(state["step"])
    return LoadedRun(model.eval(), cfg, step, phase, phase == "sparse", tok, ck, gate_at(state), source)
