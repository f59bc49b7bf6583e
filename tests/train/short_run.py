"""The tiny preset cut to 12 steps that still cross every phase (spawn at 4, hard top-1 at 8).

Shared by the training tests; each passes the log / eval / checkpoint intervals it needs.
"""

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
