"""Expert parallelism over 2 gloo processes vs one process on the same global batch.

One launch of 2 processes runs every part (process start-up dominates on a small CPU); each test reports
its own part. Single step (fp32, 1e-5): logits, loss, aux losses, gradients and the clipped norm, for DTS
soft and hard, Switch with capacity, GShard with sampled second choices, the soft gate, BASE, hash, StableMoE
(both stages), and FSDP2; and the
layout-independent checkpoint (gather by global id, reload sharded). Trainer runs (1e-4 after 8 AdamW
steps): through the spawn step, and resumed across world sizes 2 -> 1 and 1 -> 2 (the latter with FSDP2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_harness import run_ranks
from dist_workers import all_parts, equivalence, train_and_resume

from evomoe.registry import ROUTERS

pytestmark = pytest.mark.distributed

CASES = [
    ("dts", {}, {"tau": 2.0, "hard": False}, {}),  # soft phase: many experts per token
    ("dts", {"dts__threshold": 0.2}, {"tau": 0.5, "hard": False}, {}),  # soft, 1..E experts, Gumbel-dependent
    ("dts", {"dts__balance_weight": 0.5}, {"tau": 0.5, "hard": True}, {}),  # hard phase, balance loss on
    ("topk", {"topk__capacity_factor": 1.0}, {}, {}),  # Switch: capacity in global token order, aux loss
    ("topk", {"topk__k": 2, "topk__second_policy": "sampling"}, {}, {}),  # GShard: Gumbel-sampled second
    ("soft", {}, {}, {}),
    ("base", {}, {}, {}),  # BASE layers: balanced assignment over the global batch
    ("hash", {"hash__mode": "random"}, {}, {}),
    ("stablemoe", {}, {"step": 0, "total_steps": 100}, {}),  # greedy routing, balance and distillation losses
    ("stablemoe", {}, {"step": 50, "total_steps": 100}, {}),  # the frozen distilled router
    ("topk", {"topk__capacity_factor": 1.0}, {}, {"dp_shard": "fsdp"}),  # FSDP2 for the dense parameters
    ("dts", {}, {"tau": 0.5, "hard": True}, {"dp_shard": "fsdp", "ep": 1}),  # pure data parallel, FSDP2
]


# the router contract (tests/moe/test_router_contract.py): every registered router with its default options,
# early in the run (soft phase) and late (hard phase, StableMoE's stage 2)
CONTRACT = [
    (name, {}, gate, {})
    for name in ROUTERS.names()
    for gate in (
        {"tau": 2.0, "step": 0, "total_steps": 100},
        {"tau": 0.5, "hard": True, "step": 80, "total_steps": 100},
    )
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep2")
    parts = {
        "equivalence": (equivalence, (CASES,)),
        "contract": (equivalence, (CONTRACT,)),
        "training": (train_and_resume, (str(root / "runs"),)),
    }
    run_ranks(all_parts, 2, str(root), parts)
    return root


def part_result(root: Path, name: str, world: int = 2) -> None:
    fails = sorted(root.glob(f"{name}.rank*.fail"))
    if fails:
        pytest.fail("\n".join(f"{f.name}:\n{f.read_text()}" for f in fails), pytrace=False)
    assert len(list(root.glob(f"{name}.rank*.done"))) == world, f"part {name} did not finish on every rank"


def test_ep2_equals_one_process_per_router(launched):
    part_result(launched, "equivalence")


def test_ep2_equals_one_process_for_every_registered_router(launched):
    part_result(launched, "contract")


def test_ep2_training_through_spawn_and_resume_across_world_sizes(launched):
    part_result(launched, "training")
