"""Expert parallel 2 x data parallel 2 over 4 gloo processes, one launch: one step against one process
(the replica all-reduce of expert gradients), fresh experts (diversify_steps = 0) trained for 8 steps,
SIGTERM on one rank, a non-finite gradient on one rank, and resumes bitwise equal to the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_harness import run_ranks
from dist_workers import all_parts, equivalence
from dist_workers4 import fresh_experts_ep, nonfinite_on_one_rank, resume_is_bitwise, sigterm_on_one_rank
from test_ep_parallel import part_result

pytestmark = pytest.mark.distributed

CASES = [  # ep 2 of 4 ranks: every expert has two replicas
    ("dts", {}, {"tau": 2.0, "hard": False}, {"ep": 2}),
    ("topk", {"topk__capacity_factor": 1.0}, {}, {"ep": 2}),
    ("base", {}, {}, {"ep": 2}),
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep2dp2")
    parts = {
        "equivalence": (equivalence, (CASES,)),
        "fresh": (fresh_experts_ep, (str(root),)),
        "sigterm": (sigterm_on_one_rank, (str(root),)),
        "nonfinite": (nonfinite_on_one_rank, (str(root),)),
        "resume_ddp": (resume_is_bitwise, (str(root), "ddp")),
        "resume_fsdp": (resume_is_bitwise, (str(root), "fsdp")),
    }
    run_ranks(all_parts, 4, str(root), parts)
    return root


def done(root: Path, name: str) -> None:
    part_result(root, name, world=4)


def test_replica_all_reduce_matches_one_process(launched):
    done(launched, "equivalence")


def test_fresh_experts_under_ep_match_one_process(launched):
    done(launched, "fresh")


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(launched):
    done(launched, "sigterm")


def test_a_non_finite_gradient_on_one_rank_is_skipped_by_all(launched):
    done(launched, "nonfinite")


def test_a_resumed_4_process_run_is_bitwise_the_uninterrupted_one(launched):
    done(launched, "resume_ddp")


def test_a_resumed_4_process_fsdp_run_is_bitwise_the_uninterrupted_one(launched):
    done(launched, "resume_fsdp")
