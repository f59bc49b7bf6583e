"""What runs inside the 4 gloo processes (expert parallel 2 x data parallel 2) of ``test_ep2_dp2``.

Ranks 0 and 2 hold experts 0-1, ranks 1 and 3 experts 2-3 (``ep_rank = rank % ep``): an expert's gradient
is summed over its two replicas (the replica all-reduce, which 2 processes never run).
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from dist_workers import check_weights, run_trainer, synthetic_data, train_cfg, weights_of

from evomoe.train.trainer import Trainer


def env_of_rank() -> dict[str, str]:
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def trainer_for(cfg, out: Path) -> Trainer:
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, out, env=env_of_rank(), log=lambda s: None, progress=False, data=synthetic_data())


def gathered(value) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def digests(model: torch.nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def fresh_experts_ep(rank: int, world: int, root: str) -> None:
    """diversify_steps = 0 (every compare baseline): E fresh experts from step 0, EP 2 x DP 2 vs 1 process."""
    root = Path(root)
    cfg = train_cfg(ep=2)
    cfg.evolve.diversify_steps = 0
    if rank == 0:
        single_cfg = train_cfg(ep=1)
        single_cfg.evolve.diversify_steps = 0
        want = run_trainer(single_cfg, root / "fresh_single", {}).model.state_dict()
    dist.barrier()
    got = weights_of(run_trainer(cfg, root / "fresh_ep", env_of_rank()))
    if rank == 0:
        assert got.keys() == want.keys()
        check_weights("fresh experts, EP 2 x DP 2 vs one process", got, want, 1e-4)


def sigterm_on_one_rank(rank: int, world: int, root: str) -> None:
    """SIGTERM reaches rank 1 only: every rank stops after the same step, with one checkpoint of it."""
    trainer = trainer_for(train_cfg(ep=2), Path(root) / "sigterm")
    original = trainer.train_step

    def step(step_idx, interval):
        original(step_idx, interval)
        if rank == 1 and step_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag

    trainer.train_step = step
    result = trainer.run()
    stops = gathered((result["step"], result["stopped"]))
    assert len({s for s, _ in stops}) == 1 and 3 <= stops[0][0] < 8, stops
    assert stops[1][1] == "SIGTERM" and all(
        "another rank" in why for r, (_, why) in enumerate(stops) if r != 1
    ), stops
    ckpts = Path(root) / "sigterm" / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{stops[0][0]:08d}"


def nonfinite_on_one_rank(rank: int, world: int, root: str) -> None:
    """A NaN in one expert gradient on rank 2 only (after the replica all-reduce, so it reaches no other
    replica): all ranks skip that step together and the replicas stay identical."""
    trainer = trainer_for(train_cfg(ep=2), Path(root) / "nonfinite")
    original = trainer.par.sync_grads

    def sync_then_poison(model):
        original(model)
        if rank == 2 and trainer.state.step == 5:
            shard = next(p for p in model.parameters() if id(p) in trainer.par.sharded and p.grad is not None)
            shard.grad.view(-1)[0] = float("nan")

    trainer.par.sync_grads = sync_then_poison
    trainer.run()
    assert gathered(trainer.state.skipped_total) == [1] * world
    mine = digests(trainer.model)
    every = gathered(mine)
    for r in range(world):
        same_shard = r % 2 == rank % 2
        for name, h in every[r].items():
            if same_shard or id(dict(trainer.model.named_parameters())[name]) not in trainer.par.sharded:
                assert h == mine[name], f"rank {r} and rank {rank} differ in {name}"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


TIMING = ("tokens_per_s", "train_seconds", "a2a_seconds_per_step", "router_gather_seconds_per_step")


def resume_is_bitwise(rank: int, world: int, root: str, dp_shard: str) -> None:
    """A 4-process run resumed from its checkpoints of step 2 (dense phase) and step 4 (after the spawn at
    step 3) logs bitwise the losses, gradient norms and weights of the uninterrupted 4-process run. With 4
    ranks the all-reduce's summation order depends on where a gradient sits in its bucket (2 ranks add in
    one order only), so the dense gradients' bucket layout must not depend on when the job started."""
    import json  # noqa: PLC0415

    root = Path(root) / f"resume_{dp_shard}"
    cfg = lambda: train_cfg(ep=2, dp_shard=dp_shard)  # noqa: E731
    c = cfg()
    c.train.log_every, c.train.ckpt_every, c.train.keep_checkpoints = 1, 2, 10
    whole = run_trainer(c, root / "whole", env_of_rank())
    want = weights_of(whole)
    rows = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k not in TIMING}
        for line in (root / d / "metrics.jsonl").read_text().splitlines()
    ]
    got = {}
    for at in (2, 4):  # every rank runs both resumes before rank 0 checks (a failed check must not hang)
        c = cfg()
        c.train.log_every, c.train.ckpt_every, c.train.keep_checkpoints = 1, 2, 10
        ckpt = root / "whole" / "checkpoints" / f"step_{at:08d}"
        got[at] = weights_of(run_trainer(c, root / f"from{at}", env_of_rank(), ckpt))
    if rank != 0:
        return
    problems = []
    for at in (2, 4):
        uninterrupted = [r for r in rows("whole") if r["step"] > at]
        resumed = rows(f"from{at}")
        assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted], resumed
        for r, u in zip(resumed, uninterrupted, strict=True):
            diff = {k: (r[k], u.get(k)) for k in r if r[k] != u.get(k)}
            if diff:
                problems.append(f"resumed at step {at}: step {r['step']} differs: {diff}")
        problems += [
            f"resumed at step {at}: {n} differs" for n, w in want.items() if not torch.equal(got[at][n], w)
        ]
    assert not problems, f"{dp_shard}: " + "\n".join(problems)
