"""The trainer hands the gate its progress: in training, ``dts_plus``'s cap on experts per token falls from
``cap_start`` at the spawn to 1 once the temperature decay is done, before the hard switch (the router's
own tests give it the progress directly; this checks the trainer does)."""

from __future__ import annotations

from short_run import run_trainer

from evomoe.config import load_config
from evomoe.train.metrics import read_jsonl


def test_dts_plus_cap_reaches_one_expert_by_the_end_of_the_soft_phase(tmp_path, evomoe_cache):
    args = [
        "--train.steps=10",
        "--train.threads=1",
        "--train.eval_batches=1",
        "--train.log_every=1",
        "--train.eval_every=100",
        "--train.ckpt_every=100",
        "--evolve.diversify_steps=4",  # spawn before step 4
        "--gate.decay_steps=2",  # progress 0 at step 4, 0.5 at 5, 1 from step 6
        "--gate.hard_after=5",  # soft phase: steps 4..8
        "--router.name=dts_plus",
        "--router.dts_plus.cap_start=3",
        "--router.dts_plus.threshold=0.0",  # every expert passes: the cap alone limits the selection
    ]
    run_trainer(load_config("tiny", args), tmp_path, {"EVOMOE_CACHE": str(evomoe_cache)})
    rows = {r["step"] - 1: r for r in read_jsonl(tmp_path / "metrics.jsonl")}  # by the step that ran
    assert [rows[s]["phase"] for s in range(3, 10)] == ["diversify"] + ["sparsify"] * 5 + ["sparse"]
    caps = [rows[s]["max_experts_per_token"] for s in range(4, 9)]
    assert caps == [3, 2, 1, 1, 1], caps  # cap(progress) = 3, 2, then 1 once the decay is done
    assert all(rows[s]["experts_per_token"] == 1.0 for s in (6, 7, 8))
