"""Numerical trouble: non-finite losses and gradients skip the update (and say where), too many in a row
stop the run with a clear message, and what stays in float32 under bf16 autocast.
"""

from __future__ import annotations

import math

import pytest
import torch

from evomoe.config import load_config
from evomoe.evolve import spawn_model
from evomoe.models import GPT
from evomoe.moe.router import GateState
from evomoe.tasks.lm import lm_forward
from evomoe.train import checkpoint as ckpt
from evomoe.train.metrics import IntervalStats, read_jsonl
from evomoe.train.trainer import Trainer

SHORT = [
    "--train.steps=12",
    "--evolve.diversify_steps=4",
    "--gate.decay_steps=4",
    "--gate.hard_after=4",
    "--train.threads=1",
    "--train.eval_every=12",
    "--train.ckpt_every=4",
    "--train.eval_batches=1",
    "--train.log_every=1",
    "--train.max_skipped_steps=3",
]


def make_trainer(tmp_path, cache, *extra: str) -> tuple[Trainer, list[str]]:
    logs: list[str] = []
    (tmp_path / "run").mkdir(exist_ok=True)
    cfg = load_config("tiny", SHORT + list(extra))
    trainer = Trainer(
        cfg, tmp_path / "run", env={"EVOMOE_CACHE": str(cache)}, log=logs.append, progress=False
    )
    return trainer, logs


def nan_loss_at(model: torch.nn.Module, steps: set[int]) -> None:
    """Make the model's training loss NaN at the given (0-based) steps (through the logits the task's loss
    reads); the graph stays connected."""
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        gate = kwargs.get("gate")
        if model.training and gate is not None and gate.step in steps:
            out.logits = out.logits * float("nan")
        return out

    model.forward = forward


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adam_steps(opt) -> list[float]:
    return sorted(float(s["step"]) for s in opt.state.values())


def test_non_finite_loss_skips_the_update(tmp_path, evomoe_cache):
    trainer, logs = make_trainer(tmp_path, evomoe_cache)
    nan_loss_at(trainer.model, {2, 6})  # one in the dense phase, one after the spawn
    interval = IntervalStats()
    for step in range(8):
        before, moments = params(trainer.model), adam_steps(trainer.opt)
        trainer.train_step(step, interval)
        after = params(trainer.model)
        if step in (2, 6):
            assert all(torch.equal(before[n], after[n]) for n in after), f"step {step} updated the weights"
            assert adam_steps(trainer.opt) == moments  # the optimizer state did not move either
        elif step != 4:  # (step 4 spawns: new parameters)
            assert any(not torch.equal(before[n], after[n]) for n in after)
    skipped = [line for line in logs if "update skipped" in line]
    assert len(skipped) == 2
    assert skipped[0].startswith("step 3: non-finite loss nan") and skipped[1].startswith(
        "step 7: non-finite loss nan"
    )
    assert trainer.state.skipped_total == 2 and trainer.state.skipped_in_a_row == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_non_finite_steps_stop_the_run(cli, tmp_path, monkeypatch):
    real = GPT.forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        gate = kwargs.get("gate")
        if self.training and gate is not None and gate.step >= 5:
            out.logits = out.logits * float("inf") * 0.0  # NaN logits: a NaN task loss
        return out

    monkeypatch.setattr(GPT, "forward", forward)
    out = tmp_path / "run"
    rc, stdout, err = cli("train", "tiny", "--no-progress", *SHORT, "--out", out)
    assert rc == 2
    assert "error: 3 non-finite steps in a row (train.max_skipped_steps = 3) at step 8" in err
    assert "lower train.lr, use fp32, or check the data; the last good checkpoint is kept" in err
    for step in (6, 7, 8):
        assert f"step {step}: non-finite loss nan" in err
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0, 0, 1, 2]
    assert rows[-1]["loss"] == "nan"  # written as a string: metrics.jsonl stays valid JSON


def test_skips_that_are_not_consecutive_do_not_stop_the_run(tmp_path, evomoe_cache):
    trainer, logs = make_trainer(tmp_path, evomoe_cache)
    nan_loss_at(trainer.model, {1, 2, 4, 5, 7, 8})  # never 3 in a row
    result = trainer.run()
    assert result["step"] == 12 and trainer.state.skipped_total == 6
    assert ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000012")


def test_skip_names_the_layer_with_the_non_finite_gradient(tmp_path, evomoe_cache):
    trainer, logs = make_trainer(tmp_path, evomoe_cache)
    name = "blocks.1.attn.proj.weight"
    param = dict(trainer.model.named_parameters())[name]
    poison = {"on": False}
    param.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    interval = IntervalStats()
    for step in range(3):
        poison["on"] = step == 1
        trainer.train_step(step, interval)
    skipped = [line for line in logs if "update skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("step 2:")
    assert name in skipped[0], skipped[0]


# ----------------------------------------------------------------------------------------------------
# what stays in float32 under bf16 autocast


@pytest.mark.parametrize("router", ["dts", "topk", "soft", "base", "hash", "stablemoe"])
def test_router_probabilities_and_loss_are_float32_under_bf16_autocast(router):
    cfg = load_config("tiny", [f"--router.name={router}", "--model.vocab_size=256"])
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    info = {"vocab_size": 256}
    if router == "hash":
        info["token_counts"] = torch.ones(256, dtype=torch.long)
    spawn_model(model, cfg, torch.Generator().manual_seed(0), **info)
    seen = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda m, args, out: seen.append(out))
        gate = getattr(layer.router, "gate", None)
        if gate is not None:  # the learned gate's logits
            gate.register_forward_hook(lambda m, args, out: seen.append(("logits", out)))
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_forward(model, x, x, gate=GateState(tau=1.0))
    assert out.logits.dtype == torch.bfloat16  # autocast is really on
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    routings = [s for s in seen if not isinstance(s, tuple)]
    assert len(routings) == len(model.moe_layers())
    for r in routings:
        assert r.weight_P.dtype == torch.float32
        assert r.probs_TE is None or r.probs_TE.dtype == torch.float32
    for _, logits in (s for s in seen if isinstance(s, tuple)):
        assert logits.dtype == torch.float32


def test_bf16_training_keeps_master_weights_and_optimizer_state_in_float32(tmp_path, evomoe_cache):
    trainer, logs = make_trainer(tmp_path, evomoe_cache, "--train.precision=bf16", "--train.steps=6")
    interval = IntervalStats()
    for step in range(6):  # the spawn happens at step 4
        trainer.train_step(step, interval)
    assert trainer.model.spawned and trainer.state.skipped_total == 0
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    dtypes = {v.dtype for s in trainer.opt.state.values() for k, v in s.items() if k != "step"}
    assert dtypes == {torch.float32}
    assert math.isfinite(interval.row()["loss"])
