"""``evomoe generate`` and ``evomoe export`` on the translation and masked-LM tasks, through the command line
on tiny runs: a translation run translates the prompt exactly as its evaluation did (beam and greedy), and
greedy equals a slow re-decoding of the whole prefix; a masked-LM run fills ``<mask>`` with the argmax of
the model's logits (or samples, with the LM's options); a dense masked LM exports to a transformers class
that gives the same logits and tokenizes the prompt the same way; what no class reproduces is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomoe.train.load_run import load_run

FEW = [
    "--no-progress",
    "--train.steps=12",
    "--evolve.diversify_steps=3",
    "--gate.decay_steps=3",
    "--gate.hard_after=5",
    "--train.eval_every=12",
    "--train.eval_batches=1",
    "--train.threads=1",
]
MLM_PROMPT = "def <mask>(self, x):\n    return <mask>"


def train(tmp_path_factory, cli_env, name: str, *args: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    cmd = [sys.executable, "-m", "evomoe", "train", *args, *FEW, "--out", str(out)]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, cli_env) -> Path:
    synthetic = ["--task.mt.synthetic_pairs=500", "--task.mt.eval_sentences=6", "--train.ckpt_every=12"]
    return train(tmp_path_factory, cli_env, "mt", "tiny-mt", *synthetic)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, cli_env) -> Path:
    """Checkpoints at steps 2 (dense: before the spawn at step 3), 4, ..., 12 (MoE, hard top-1)."""
    data = ["--data.tokenizer=bpe", "--data.vocab_size=300", "--data.max_bytes=60000"]
    ckpt = ["--train.ckpt_every=2", "--train.keep_checkpoints=10"]
    return train(tmp_path_factory, cli_env, "mlm", "tiny-mlm", *data, *ckpt)


def ids_of(cli, *argv) -> dict:
    rc, out, err = cli("generate", *argv, "--ids")
    assert rc == 0, err[-2000:]
    return json.loads(out)


# ------------------------------------------------------------------------------------------ translation


def test_translates_as_the_evaluation_did(cli, mt_run):
    rows = [json.loads(s) for s in (mt_run / "translations" / "step_000012.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows[:3]:
        rc, out, err = cli("generate", mt_run, "--prompt", row["source"])
        assert rc == 0 and out == row["beam"] + "\n", err[-2000:]  # the run's own beam and length penalty
        rc, out, err = cli("generate", mt_run, "--prompt", row["source"], "--beam", "1")
        assert rc == 0 and out == row["greedy"] + "\n", err[-2000:]


@torch.no_grad()
def test_greedy_translation_equals_full_redecoding(cli, mt_run):
    run = load_run(mt_run)
    tok, limit = run.tokenizer, run.cfg.model.seq_len - 1
    source = "abc def ghi"
    got = ids_of(cli, mt_run, "--prompt", source, "--beam", "1")
    src = torch.tensor([tok.encode(source).tolist()])
    assert got["prompt_ids"] == src[0].tolist()
    want, tgt = [], [tok.bos_id]
    for _ in range(limit):  # the slow twin: the whole prefix again at every step, no cache
        nxt = int(run.model(src, torch.tensor([tgt]), gate=run.gate).logits[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        want.append(nxt)
        tgt.append(nxt)
    assert got["new_ids"] == want
    assert (
        len(ids_of(cli, mt_run, "--prompt", source, "--beam", "1", "--max-new-tokens", "2")["new_ids"]) <= 2
    )


def test_translation_options_and_limits(cli, mt_run):
    for option in (["--temperature", "0.5"], ["--top-k", "3"], ["--seed", "1"]):
        rc, out, err = cli("generate", mt_run, "--prompt", "abc", *option)
        assert rc == 2 and f"error: {option[0]}: a translation run decodes with greedy or beam search" in err
    rc, out, err = cli("generate", mt_run, "--prompt", "abc " * 40)
    assert rc == 2 and "the source has at most model.seq_len = 24 tokens" in err, err
    rc, out, err = cli("generate", mt_run, "--prompt", "abc", "--max-new-tokens", "24")
    assert rc == 2 and "--max-new-tokens = 24: a translation has at most model.seq_len - 1 = 23 tokens" in err
    rc, out, err = cli("generate", mt_run, "--prompt", "   ")
    assert rc == 2 and "the prompt encodes to no tokens" in err


def test_translation_run_does_not_export(cli, mt_run, tmp_path):
    rc, out, err = cli("export", mt_run, "--out", tmp_path / "hf")
    assert rc == 2 and "translation model" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------ masked LM


@torch.no_grad()
def test_fills_masks_with_the_argmax(cli, mlm_run):
    run = load_run(mlm_run)
    tok = run.tokenizer
    got = ids_of(cli, mlm_run, "--prompt", MLM_PROMPT, "--temperature", "0")
    ids = got["prompt_ids"]
    assert ids[0] == tok.bos_id and ids.count(tok.mask_id) == 2
    logits = run.model(torch.tensor([ids]), gate=run.gate).logits[0, :, : tok.num_normal]  # text ids only
    masks = [i for i, t in enumerate(ids) if t == tok.mask_id]
    assert got["new_ids"] == [int(logits[i].argmax()) for i in masks]
    filled = list(ids)
    for i, t in zip(masks, got["new_ids"]):
        filled[i] = t
    rc, out, err = cli("generate", mlm_run, "--prompt", MLM_PROMPT)  # argmax is the masked LM's default
    assert rc == 0 and out == tok.decode(filled) + "\n", err[-2000:]
    # the mask takes the space before it (as RoBERTa's <mask> does): "def" then <mask>, not "def", " "
    assert ids[1 : ids.index(tok.mask_id)] == tok.encode("def").tolist()


def test_fills_masks_by_sampling(cli, mlm_run):
    a = ids_of(cli, mlm_run, "--prompt", MLM_PROMPT, "--temperature", "3", "--seed", "1")
    assert a == ids_of(cli, mlm_run, "--prompt", MLM_PROMPT, "--temperature", "3", "--seed", "1")
    seeds = [
        ids_of(cli, mlm_run, "--prompt", MLM_PROMPT, "--temperature", "3", "--seed", str(s)) for s in range(6)
    ]
    assert len({tuple(s["new_ids"]) for s in seeds}) > 1  # a high temperature samples
    top1 = ids_of(cli, mlm_run, "--prompt", MLM_PROMPT, "--temperature", "3", "--top-k", "1")
    assert top1 == ids_of(cli, mlm_run, "--prompt", MLM_PROMPT, "--temperature", "0")


def test_masked_lm_options_and_limits(cli, mlm_run):
    rc, out, err = cli("generate", mlm_run, "--prompt", "def f(x):")
    assert rc == 2 and "the prompt has no <mask>" in err, err
    for option in (["--max-new-tokens", "3"], ["--beam", "2"], ["--length-penalty", "1"]):
        rc, out, err = cli("generate", mlm_run, "--prompt", MLM_PROMPT, *option)
        assert rc == 2 and f"error: {option[0]}: a masked-LM run fills each <mask> of the prompt" in err
    rc, out, err = cli("generate", mlm_run, "--prompt", "x <mask>" * 40)
    assert rc == 2 and "model.seq_len = 64" in err, err


# ------------------------------------------------------------------------------------------ export


def test_moe_masked_lm_does_not_export(cli, mlm_run, tmp_path):
    rc, out, err = cli("export", mlm_run, "--out", tmp_path / "hf")
    assert rc == 2 and "no transformers masked-LM class has MoE feed-forward layers" in err, err[-2000:]


@torch.no_grad()
def test_dense_masked_lm_exports_and_transformers_agrees(cli, mlm_run, tmp_path):
    import transformers as tf

    dense, out = mlm_run / "checkpoints" / "step_00000002", tmp_path / "hf"
    rc, stdout, err = cli("export", dense, "--out", out)
    assert rc == 0 and "as megatron-bert" in stdout, err[-2000:]
    run = load_run(dense)
    assert not run.model.spawned
    got = ids_of(cli, dense, "--prompt", MLM_PROMPT, "--temperature", "0")
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    assert hf_tok(MLM_PROMPT)["input_ids"] == got["prompt_ids"]  # same ids, <s> and <mask> included
    hf = tf.AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.tensor([got["prompt_ids"]])
    assert (hf(idx).logits - run.model(idx).logits).abs().max() < 1e-4
    cfg = hf.config
    tok = run.tokenizer
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok.mask_token_id == tok.mask_id


def test_export_replaces_a_folder_only_when_asked(cli, mlm_run, tmp_path):
    dense, out = mlm_run / "checkpoints" / "step_00000002", tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    rc, stdout, err = cli("export", dense, "--out", out)
    assert rc == 2 and f"error: --out '{out}' is not empty" in err and "--overwrite" in err, err[-2000:]
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]
    rc, stdout, err = cli("export", dense, "--out", out, "--overwrite")
    assert rc == 0 and not (out / "model.safetensors.index.json").exists(), err[-2000:]
    rc, stdout, err = cli("export", dense, "--out", mlm_run, "--overwrite")
    assert rc == 2 and "holds the run being exported" in err and (mlm_run / "checkpoints").is_dir()
