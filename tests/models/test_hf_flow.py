"""End to end through the CLI: import a tiny Llama / Qwen2 (and a native llama-style run), upcycle it
through the hard switch, export, and compare transformers' greedy generation with ``evomoe generate``; both
stop at the source model's end-of-text id, which the export keeps (with its bos id and context).
An MoE grown from GPT-2 has no transformers class: ``export`` fails clearly, ``generate`` works."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from .hf_tiny import save_tiny  # noqa: E402

# diversify [0, 2) -> DTS soft [2, 6) -> hard top-1 [6, 10); the checkpoint at step 10 is past the switch
FAST = [
    "--no-progress",
    "--train.steps=10",
    "--evolve.diversify_steps=2",
    "--gate.decay_steps=3",
    "--gate.hard_after=4",
    "--train.threads=1",
    "--train.batch_size=4",
    "--train.log_every=5",
    "--train.eval_every=10",
    "--train.eval_batches=1",
    "--train.ckpt_every=10",
    "--data.max_bytes=60000",
]
PROMPT = "def f(x):\n    return"


def hf_greedy(directory, prompt_ids: list[int], n: int) -> list[int]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    idx = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0)  # the export's eos
    return out[0, len(prompt_ids) :].tolist()


def evomoe_greedy(cli, run, n: int) -> tuple[list[int], list[int]]:
    rc, out, err = cli(
        "generate", run, "--prompt", PROMPT, "--max-new-tokens", n, "--temperature", 0, "--ids"
    )
    assert rc == 0, err[-2000:]
    ids = json.loads(out)
    return ids["prompt_ids"], ids["new_ids"]


def upcycle_and_compare(cli, src, tmp_path, n: int = 8) -> str:
    run, out = tmp_path / "moe_run", tmp_path / "moe_hf"
    rc, _, err = cli(
        "train", "upcycle", *FAST, f"--model.init_from={src}", "--model.seq_len=32", "--out", run
    )
    assert rc == 0, err[-3000:]
    rc, stdout, err = cli("export", run, "--out", out)
    assert rc == 0, err[-2000:]
    prompt_ids, ours = evomoe_greedy(cli, run, n)
    assert ours == hf_greedy(out, prompt_ids, n)
    source, exported = (json.loads((d / "config.json").read_text()) for d in (src, out))
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert exported.get(key) == source.get(key), key
    return stdout


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_upcycled_model_generates_like_transformers(family, cli, tmp_path):
    src = save_tiny(family, tmp_path / "src", bos_token_id=1, eos_token_id=2)
    assert "as qwen2_moe" in upcycle_and_compare(cli, src, tmp_path)


@pytest.mark.slow
def test_both_stop_at_the_end_of_text(cli, tmp_path):
    """The source's eos is the token the upcycled model generates 4th: both generators stop there."""
    src = save_tiny("llama", tmp_path / "src")
    upcycle_and_compare(cli, src, tmp_path, n=8)
    _, free = evomoe_greedy(cli, tmp_path / "moe_run", 8)
    stop = free[3]
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            cfg = json.loads((src / name).read_text())
            (src / name).write_text(json.dumps({**cfg, "eos_token_id": stop}))
    run, out = tmp_path / "stop_run", tmp_path / "stop_hf"
    shutil.copytree(tmp_path / "moe_run", run)
    (run / "source_model.json").unlink()  # an older run: export reads the source directory itself
    rc, _, err = cli("export", run, "--out", out)
    assert rc == 0, err[-2000:]
    prompt_ids, ours = evomoe_greedy(cli, run, 8)
    assert ours == free[: free.index(stop) + 1] == hf_greedy(out, prompt_ids, 8)


@pytest.mark.slow
def test_native_llama_dense_export_import_upcycle(cli, tmp_path):
    dense, dense_hf = tmp_path / "dense", tmp_path / "dense_hf"
    shape = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2"]
    style = ["--model.style=llama", "--model.activation=swiglu", "--model.d_ff=64", "--model.seq_len=32"]
    data = ["--data.tokenizer=bpe", "--data.vocab_size=300", "--moe.enabled=false"]
    rc, _, err = cli("train", "tiny", *FAST, *shape, *style, *data, "--out", dense)
    assert rc == 0, err[-3000:]
    rc, stdout, err = cli("export", dense, "--out", dense_hf)
    assert rc == 0 and "as llama" in stdout, err[-2000:]
    prompt_ids, ours = evomoe_greedy(cli, dense, 8)
    assert ours == hf_greedy(dense_hf, prompt_ids, 8)
    upcycle_and_compare(cli, dense_hf, tmp_path)


@pytest.mark.slow
def test_gpt2_moe_generates_but_does_not_export(cli, tmp_path):
    src = save_tiny("gpt2", tmp_path / "src")
    run = tmp_path / "run"
    rc, _, err = cli("train", "upcycle", *FAST, f"--model.init_from={src}", "--out", run)
    assert rc == 0, err[-3000:]
    rc, _, err = cli("export", run, "--out", tmp_path / "hf")
    assert rc == 2 and "grown from GPT-2 has no class" in err
    _, new = evomoe_greedy(cli, run, 6)
    assert len(new) == 6
