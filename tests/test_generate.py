"""Generation: the key-value cache gives the logits of full re-decoding, for both styles, dense and MoE;
generation stops at an end-of-text id; ``evomoe generate`` checks its options before loading anything and
says when a run has no checkpoint yet."""

from __future__ import annotations

import shutil

import pytest
import torch

from evomoe.config import Config, ModelConfig, MoEConfig
from evomoe.evolve import spawn_model
from evomoe.generate import generate, sample_next
from evomoe.models import GPT
from evomoe.models.layers import KVCache


def tiny(style: str, moe: bool) -> GPT:
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, seq_len=40, style=style)
    if style == "llama":
        mcfg.activation, mcfg.n_kv_heads, mcfg.qkv_bias = "swiglu", 2, True
    model = GPT(mcfg, MoEConfig(num_experts=4))
    if moe:
        cfg = Config()
        cfg.model, cfg.moe.num_experts, cfg.evolve.noise, cfg.router.gate_init = mcfg, 4, 0.5, "normal"
        spawn_model(model, cfg, torch.Generator().manual_seed(0), vocab_size=50)
    return model.eval()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("moe", [False, True])
def test_cached_decoding_equals_full_redecoding(style, moe):
    model = tiny(style, moe)
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache.empty(2)
        parts = [model(idx[:, :7], cache=cache).logits, model(idx[:, 7:12], cache=cache).logits]
        parts += [model(idx[:, i : i + 1], cache=cache).logits for i in range(12, 20)]
    assert cache.length == 20
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    fast = generate(model, idx[:, :5], 12, temperature=0.0)
    slow = generate(model, idx[:, :5], 12, temperature=0.0, cache=False)
    assert torch.equal(fast, slow)
    sampled = [
        generate(model, idx[:, :5], 8, temperature=1.0, top_k=5, seed=3, cache=c) for c in (True, False)
    ]
    assert torch.equal(*sampled)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, 0.0).item() == 1
    draws = {
        sample_next(logits, 5.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
        for s in range(50)
    }
    assert draws == {1, 3}  # only the two best, and both of them at a high temperature
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


def test_too_long_is_an_error():
    with pytest.raises(ValueError, match="exceeds model.seq_len = 40"):
        generate(tiny("llama", False), torch.zeros(1, 30, dtype=torch.long), 20)


def test_generation_stops_at_a_stop_id():
    """The end-of-text id ends generation (as transformers' generate does with an eos id)."""
    model = tiny("gpt2", True)
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))
    free = generate(model, prompt, 12, temperature=0.0)
    stop = int(free[0, 5 + 3])  # the 4th generated token
    first = next(i for i in range(5, 17) if int(free[0, i]) == stop)
    stopped = generate(model, prompt, 12, temperature=0.0, stop_ids=(stop,))
    assert torch.equal(stopped, free[:, : first + 1])  # up to and including the stop id


# ----------------------------------------------------------------------------------------------------
# the command line: options are checked before anything is loaded, and a run without a checkpoint


BAD_OPTIONS = [
    (["--max-new-tokens", "-3"], "--max-new-tokens = -3: must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens = 0: must be >= 1"),
    (["--temperature", "-1"], "--temperature = -1.0: must be >= 0 (0: greedy)"),
    (["--temperature", "nan"], "--temperature = nan: must be >= 0 (0: greedy)"),
    (["--top-k", "-2"], "--top-k = -2: must be >= 0 (0: every token)"),
    (["--seed", "-1"], "--seed = -1: must be >= 0"),
    (["--beam", "0"], "--beam = 0: must be >= 1 (1: greedy)"),
    (["--length-penalty", "-0.5"], "--length-penalty = -0.5: must be >= 0"),
]


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option,message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_generate_options_are_errors(cli, copy_run, option, message):
    run = copy_run()
    before = snapshot(run)
    rc, out, err = cli("generate", run, "--prompt", "def f(", *option)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and lines == [f"error: {message}"], err[-2000:]
    assert out == "" and "Traceback" not in err
    assert snapshot(run) == before  # nothing written


def test_options_a_language_model_does_not_use_are_errors(cli, tiny_run):
    rc, out, err = cli("generate", tiny_run, "--prompt", "def f(", "--beam", "2")
    assert rc == 2 and "--beam: a language model's run continues the prompt by sampling" in err, err


def test_generate_on_a_run_without_checkpoint(cli, copy_run):
    run = copy_run()
    shutil.rmtree(run / "checkpoints")
    for command in (["generate", run, "--prompt", "x"], ["export", run, "--out", run.parent / "hf"]):
        rc, out, err = cli(*command)
        assert rc == 2 and f"error: no checkpoint yet in '{run}'" in err, err[-2000:]
        assert "neither a run directory nor a checkpoint" not in err
    (run / "checkpoints").mkdir()
    rc, out, err = cli("generate", run, "--prompt", "x")
    assert rc == 2 and f"error: no checkpoint yet in '{run}'" in err, err[-2000:]
    rc, out, err = cli("generate", run.parent / "nothing", "--prompt", "x")
    assert rc == 2 and "is neither a run directory nor a checkpoint" in err
    assert not (run.parent / "hf").exists()
