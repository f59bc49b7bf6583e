"""The fast step modes (``train.compile``, ``train.precision = "bf16"``; ``evomoe.train.compile``) against
their slow references, on tiny shapes: the CPU bf16 math attention against SDPA, a compiled model against
the eager one for several routers (soft and hard gates, padding) with no recompile when the schedule values
change, exact resume within the compiled bf16 mode, compiled runs of every task next to eager ones (same
FLOPs count, close losses), and the NaN guard around a compiled step.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_resume import exact_view, run_rows, short_cfg

from evomoe.config import load_config
from evomoe.evolve import spawn_model
from evomoe.models import GPT
from evomoe.models.blocks import Attention, attention_mask, math_attention, math_attention_pays
from evomoe.moe.router import GateState
from evomoe.tasks.lm import next_token_loss
from evomoe.train import compile as compile_mod
from evomoe.train.compile import compile_counts, resolve_compile
from evomoe.train.metrics import IntervalStats
from evomoe.train.trainer import Trainer


def qkv(seed: int = 0, B: int = 2, H: int = 2, S: int = 8, Dh: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, Dh, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "causal padded", "bidirectional padded"])
def test_math_attention_matches_sdpa(mode):
    q, k, v = qkv()
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, -3:] = False
    kind = mode.split()[0]
    mask = attention_mask(kind, 8, 8, valid, q.device) if "padded" in mode else None
    causal = kind == "causal" and mask is None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    got = math_attention(q, k, v, mask, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    grads_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_math_attention_runs_only_under_cpu_autocast_and_stays_close_to_fp32():
    cfg = load_config("tiny", ["--model.vocab_size=64"]).model
    torch.manual_seed(0)
    attn = Attention(cfg, "causal")
    x = torch.randn(2, 16, cfg.d_model)
    assert not math_attention_pays(x)
    want = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert math_attention_pays(x.bfloat16())
        got = attn(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)


def spawned_gpt(router: str, seed: int = 0) -> GPT:
    cfg = load_config("tiny", [f"--router.name={router}", "--model.vocab_size=256"])
    torch.manual_seed(seed)
    model = GPT(cfg.model, cfg.moe)
    info = {"vocab_size": 256}
    if router == "hash":
        info["token_counts"] = torch.ones(256, dtype=torch.long)
    spawn_model(model, cfg, torch.Generator().manual_seed(seed), **info)
    return model


def loss_and_grads(model, fwd, x, valid, gate):
    torch.manual_seed(3)  # the same draws (DTS's noise) in both modes
    out = fwd(x[:, :-1], valid_BS=valid, gate=gate)
    targets = x[:, 1:].masked_fill(~valid, -100)
    loss = next_token_loss(out.logits, targets) + out.aux_loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss.detach(), out, grads


@pytest.mark.parametrize("router", ["dts", "topk", "hash", "soft"])
def test_compiled_model_matches_eager_for_routers(router):
    """The router contract's phases (soft and hard gates, padded batch) through the compiled model: the same
    loss, gradients and routing statistics as eager, and no recompile when the temperature moves."""
    model = spawned_gpt(router)
    compiled = torch.compile(model, dynamic=False)
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, -5:] = False
    gates = [GateState(tau=2.0, hard=False, step=1), GateState(tau=0.5, hard=True, step=50)]
    for i, gate in enumerate([*gates, GateState(tau=1.3, hard=False, step=2)]):
        want_loss, want_out, want_grads = loss_and_grads(model, model, x, valid, gate)
        got_loss, got_out, got_grads = loss_and_grads(model, compiled, x, valid, gate)
        if i == 1:
            frames = compile_counts()["frames"]
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for s, t in zip(got_out.stats, want_out.stats, strict=True):
            assert torch.equal(s.counts_E, t.counts_E) and torch.equal(s.tokens, t.tokens)
    assert compile_counts()["frames"] == frames  # a third temperature compiled nothing new


def test_compiled_bf16_resume_is_bitwise(tmp_path, evomoe_cache):
    """Stopped inside the soft phase and resumed: the rows of the uninterrupted compiled bf16 run."""
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    cfg = lambda: short_cfg(train__log_every=4, train__compile="true", train__precision="bf16")  # noqa: E731
    want = run_rows(cfg(), tmp_path / "ref", env)
    run_rows(cfg(), tmp_path / "cut", env, stop_after=6)
    got = run_rows(cfg(), tmp_path / "cut", env, resume=True)
    assert [r["step"] for r in got] == [4, 8, 12]
    assert exact_view(got) == exact_view(want)


def test_compiled_bf16_at_two_threads_repeats_bitwise(tmp_path, evomoe_cache):
    """Two compiled bf16 runs at two threads: the same rows. Inductor lowers the embedding's backward to
    atomic adds in a parallel loop, an order that changes run to run; the compiled mode keeps torch's
    deterministic algorithms on (the aten kernel instead)."""
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    over = {"train__threads": 2, "train__compile": "true", "train__precision": "bf16", "train__log_every": 2}
    over["train__batch_size"] = 32
    first = run_rows(short_cfg(**over), tmp_path / "a", env)
    second = run_rows(short_cfg(**over), tmp_path / "b", env)
    assert len(first) == 6 and exact_view(first) == exact_view(second)


SHORT_PHASES = [
    "--train.steps=8",
    "--evolve.diversify_steps=3",
    "--gate.decay_steps=3",
    "--gate.hard_after=3",
    "--train.threads=1",
    "--train.log_every=2",
    "--train.eval_every=8",
    "--train.ckpt_every=100",
    "--train.eval_batches=1",
]


@pytest.mark.parametrize("preset", ["tiny", "tiny-mlm"])
def test_compiled_run_of_each_task_matches_eager(preset, tmp_path, evomoe_cache):
    """The fixed-shape tasks train compiled (fp32) through all three phases: the same FLOPs and tokens
    per row as eager, losses within float noise."""
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    rows = {}
    for compiled in (False, True):
        cfg = load_config(preset, [*SHORT_PHASES, f"--train.compile={str(compiled).lower()}"])
        rows[compiled] = run_rows(cfg, tmp_path / f"run-{compiled}", env)
    eager, fast = rows[False], rows[True]
    assert [r["step"] for r in fast] == [2, 4, 6, 8] and fast[-1]["phase"] == "sparse"
    assert [r["flops"] for r in fast] == [r["flops"] for r in eager]  # the FLOPs counter is unchanged
    assert [r["tokens"] for r in fast] == [r["tokens"] for r in eager]
    for a, b in zip(fast, eager, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-3), (a["step"], a["loss"], b["loss"])


def test_compiled_gradient_accumulation_matches_eager(tmp_path, evomoe_cache):
    """``train.accum_steps = 2``: the compiled micro-batch steps log the eager run's FLOPs and its losses
    within float noise."""
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    rows = {}
    for compiled in ("false", "true"):
        cfg = short_cfg(train__log_every=4, train__accum_steps=2, train__compile=compiled)
        rows[compiled] = run_rows(cfg, tmp_path / compiled, env)
    assert [r["flops"] for r in rows["true"]] == [r["flops"] for r in rows["false"]]
    for a, b in zip(rows["true"], rows["false"], strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=2e-3), (a["step"], a["loss"], b["loss"])


def test_nan_guard_around_a_compiled_step(tmp_path, evomoe_cache):
    """A non-finite loss from the compiled forward + loss skips the update (weights and optimizer state
    unchanged) and is logged, in the dense phase and after the spawn."""
    cfg = short_cfg(train__compile="true", train__precision="bf16", train__log_every=1)
    logs: list[str] = []
    (tmp_path / "run").mkdir()
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    trainer = Trainer(cfg, tmp_path / "run", env=env, log=logs.append, progress=False)
    compiled_loss = trainer.loss_fn
    bad = {2, 6}
    trainer.loss_fn = lambda out, b: (
        compiled_loss(out, b) * (float("nan") if trainer.step_gate.step in bad else 1.0)
    )
    interval = IntervalStats()
    for step in range(8):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train_step(step, interval)
        after = dict(trainer.model.named_parameters())
        if step in bad:
            assert all(torch.equal(before[n], after[n]) for n in after), f"step {step} updated the weights"
    skipped = [line for line in logs if "update skipped" in line]
    assert [s.split(":")[0] for s in skipped] == ["step 3", "step 7"]
    assert trainer.state.skipped_total == 2
    assert trainer.mode.counts()["graphs"] > 0  # the steps ran through compiled graphs


def test_a_task_with_batches_of_changing_shape_runs_eager(tmp_path, evomoe_cache):
    """MT pads each batch to its longest pair: a static graph per shape would recompile every step."""
    cfg = load_config("tiny-mt", [*SHORT_PHASES, "--train.compile=true"])
    logs: list[str] = []
    env = {"EVOMOE_CACHE": str(evomoe_cache)}
    trainer = Trainer(cfg, tmp_path, env=env, log=logs.append, progress=False)
    assert not trainer.mode.compile and trainer.fwd is trainer.model
    assert any("batches change shape" in line for line in logs)


def test_make_run_fast_mode_flags_resolve_on_the_default_preset():
    """``make run`` trains the main job with the Makefile's FAST overrides: they must stay valid fields that
    select compiled bf16 with fused AdamW (a renamed field would fail the README's first command)."""
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if x.startswith("FAST ="))
    cfg = load_config("default", line.split("=", 1)[1].split())
    t = cfg.train
    assert (t.compile, t.precision, t.optimizer_impl) == (True, "bf16", "fused")
    assert "$(FAST)" in makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]


def test_compile_auto_decides_where_it_pays(monkeypatch):
    """train.compile = "auto": on for a long single-process run of fixed shapes with a compiler found;
    off, with the reason, for each condition that fails; true / false are kept as set."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(
        compile_mod.shutil, "which", lambda name: "/usr/bin/" + name if name == "g++" else None
    )
    assert resolve_compile("auto", cpu, 2000) == (True, "cpu with g++, 2000 steps")
    off = [
        resolve_compile("auto", cpu, 2000, world_size=2),
        resolve_compile("auto", cpu, 2000, fixed_shapes=False),
        resolve_compile("auto", cpu, compile_mod.AUTO_MIN_STEPS - 1),
    ]
    assert [on for on, _ in off] == [False] * 3
    assert ["processes" in off[0][1], "change shape" in off[1][1], "warm-up" in off[2][1]] == [True] * 3
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    assert resolve_compile("auto", cpu, 2000) == (
        False,
        "no compiler for cpu (a C++ compiler on CPU, Triton on CUDA)",
    )
    assert resolve_compile(True, cpu, 1) == (True, "set") and resolve_compile(False, cpu, 10**6) == (
        False,
        "set",
    )


def test_compile_auto_in_the_config_and_the_trainer(tmp_path, evomoe_cache):
    """The config takes true, false and "auto" (saved and loaded back), and names the field for anything
    else; a short auto run trains eager and logs why."""
    from evomoe.config import ConfigError, to_toml  # noqa: PLC0415

    cfg = load_config("tiny", [*SHORT_PHASES, "--train.compile=auto"])
    assert cfg.train.compile == "auto"
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(str(tmp_path / "c.toml"), saved=True).train.compile == "auto"
    assert load_config("tiny", ["--train.compile=true"]).train.compile is True
    for bad, why in (
        ("maybe", "must be true, false or 'auto'"),
        ("3", "expected bool, got 3 \\(int\\) \\(or a word"),
    ):
        with pytest.raises(ConfigError, match=rf"train\.compile.*{why}"):
            load_config("tiny", [f"--train.compile={bad}"])
    logs: list[str] = []
    trainer = Trainer(
        cfg, tmp_path / "run", env={"EVOMOE_CACHE": str(evomoe_cache)}, log=logs.append, progress=False
    )
    assert not trainer.mode.compile and trainer.fwd is trainer.model
    assert any(line.startswith("train.compile = auto: eager (train.steps = ") for line in logs)
