"""Worker for the expert-parallel test of the masked-LM and translation tasks (run by ``dist_harness``)."""

from __future__ import annotations

import json
import os
import random
import traceback
from pathlib import Path

import torch.distributed as dist

from evomoe.config import load_config

SHORT = [
    "--train.steps=8",
    "--evolve.diversify_steps=3",
    "--gate.decay_steps=2",
    "--gate.hard_after=3",
    "--train.log_every=2",
    "--train.eval_every=4",
    "--train.ckpt_every=4",
    "--train.eval_batches=1",
    "--train.batch_size=8",
    "--train.device=cpu",
]
TASKS = {
    "tiny-mlm": ["--data.tokenizer=bytes"],
    "tiny-mt": ["--task.mt.synthetic_pairs=1000", "--task.mt.eval_sentences=6"],
}


def write_corpus(path: Path) -> None:
    rng = random.Random(0)
    words = "def class return self import from value items index count total result data list".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(3000)))


def cfg(preset: str, root: Path, ep: int):
    extra = [
        f"--data.cache_dir={root / 'cache'}",
        f"--data.corpus={root / 'corpus.txt'}",
        f"--parallel.ep={ep}",
    ]
    return load_config(preset, SHORT + TASKS[preset] + extra)


def run(preset: str, root: Path, out: Path, ep: int, env: dict):
    from evomoe.train.trainer import Trainer  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg(preset, root, ep), out, env=env, log=lambda s: None, progress=False)
    trainer.run()
    full = trainer.par.full_state_dict(trainer.model)
    return full if full is not None else trainer.model.state_dict()


def compare(preset: str, root: Path, rank: int, world: int) -> None:
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if rank == 0:
        write_corpus(root / "corpus.txt")
        want = run(preset, root, root / preset / "single", 1, {})
    dist.barrier()
    got = run(preset, root, root / preset / "ep", world, env)
    if rank != 0:
        return
    for name, w in got.items():
        err = (w - want[name]).abs().max().item()
        assert err <= 1e-4, f"{preset}: {name} differs by {err}"
    ev, ref = (
        [json.loads(x) for x in (root / preset / d / "eval.jsonl").read_text().splitlines()]
        for d in ("ep", "single")
    )
    assert [e["phase"] for e in ev] == [e["phase"] for e in ref]
    for e, r in zip(ev, ref):
        assert abs(e["val_loss"] - r["val_loss"]) < 1e-4, (e, r)
        for key in ("masked_accuracy", "bleu", "chrf"):
            assert key not in r or abs(e[key] - r[key]) < 1e-6, (key, e, r)


def seq_tasks(rank: int, world: int, root: str) -> None:
    root = Path(root)
    for preset in TASKS:
        try:
            compare(preset, root, rank, world)
            (root / f"{preset}.rank{rank}.done").write_text("ok")
        except Exception:
            (root / f"{preset}.rank{rank}.fail").write_text(traceback.format_exc())
        dist.barrier()
