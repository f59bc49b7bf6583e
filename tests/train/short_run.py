"""The tiny preset cut to 12 steps that still cross every phase (spawn at 4, hard top-1 at 8).

Shared by the training tests; each passes the log / eval / checkpoint intervals it needs.
"""

from pathlib import Path

PHASES = [
    "--train.steps=12",
    "--evolve.diversify_steps=4",
    "--gate.decay_steps=4",
    "--gate.hard_after=4",
    "--train.threads=1",
    "--train.eval_batches=1",
]


def short_overrides(**intervals: int) -> list[str]:
    """PHASES plus ``--train.<name>=<value>`` for each keyword (log_every=1, ckpt_every=4, ...)."""
    return PHASES + [f"--train.{k}={v}" for k, v in intervals.items()]


def run_trainer(cfg, out: Path, env, stop_after: int | None = None, resume: bool = False):
    """Train ``cfg`` in ``out`` in this process; ``resume``: from its newest checkpoint; ``stop_after``: stop
    after that step as the SIGTERM handler would (a checkpoint is written). Returns the trainer."""
    from evomoe.train.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out, env=env, log=lambda s: None, progress=False)
    if resume:
        trainer.restore(sorted((out / "checkpoints").glob("step_*"))[-1])
    if stop_after is not None:
        original = trainer.train_step

        def step_then_stop(step, interval):
            original(step, interval)
            if step + 1 == stop_after:
                trainer.stop_requested = "SIGTERM"

        trainer.train_step = step_then_stop
    trainer.run()
    return trainer
