"""A finished (or running) run's model for inference: the latest good checkpoint, its config, the gate's
phase at that step and the run's tokenizer (``RUN/tokenizer.json``). Used by ``export`` and ``generate``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, config_from_dict
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..evolve import spawn_model
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


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest good checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = ckpt.find_good_checkpoint(path / "checkpoints", log=lambda s: None)
        if found is None:
            raise ckpt.CheckpointError(f"no complete checkpoint under '{path}/checkpoints'")
        return found
    if not (path / "trainer.pt").is_file():
        raise ckpt.CheckpointError(f"'{path}' is neither a run directory nor a checkpoint")
    return path


def load_run(path: str | Path) -> LoadedRun:
    ck = find_checkpoint(path)
    ckpt.verify_checkpoint(ck)
    state = ckpt.load_trainer_state(ck)
    cfg = config_from_dict(state["config"])
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
    last = max(int(state["step"]) - 1, 0)
    phase = schedules.phases.phase(last)
    run_dir = ck.parent.parent
    try:
        tok = load_tokenizer(run_dir)
    except ValueError:
        tok = None
    return LoadedRun(model.eval(), cfg, int(state["step"]), phase, phase == "sparse", tok, ck)
