"""Training over a sharded corpus: exact resume where batches cross shard boundaries (shuffled order), the
passes over the training split in the logs, and a resume on changed text stopped with nothing lost."""

from __future__ import annotations

import json
import random

import numpy as np
from short_run import run_trainer, short_overrides

from evomoe.config import apply_overrides, load_config
from evomoe.train.metrics import read_jsonl


def _corpus(tmp_path, n_files=30):
    rng = random.Random(0)
    root = tmp_path / "corpus"
    root.mkdir()
    words = "alpha beta gamma delta return yield class def import lambda".split()
    for i in range(n_files):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 9))) for _ in range(60)]
        (root / f"m{i:02d}.py").write_text(f"# {i}\n" + "\n".join(lines) + "\n")
    return root


def _cfg(root, cache, *extra):
    cfg = load_config("tiny")
    args = short_overrides(log_every=1, ckpt_every=3, eval_every=6)
    args += [f"--data.corpus={root}", "--data.max_bytes=0", "--data.shard_bytes=2048", "--data.workers=1",
             "--data.order=shuffled", f"--data.cache_dir={cache}", *extra]  # fmt: skip
    return apply_overrides(cfg, args)


def test_resume_across_shard_boundaries_is_exact(tmp_path):
    root = _corpus(tmp_path)
    cfg = _cfg(root, tmp_path / "cache")
    full = run_trainer(cfg, tmp_path / "full", {})
    data = full.task.data
    assert len(data.train.parts) > 10  # shards of ~4 KB: windows of 65 tokens cross their boundaries
    starts = np.concatenate([data._shuffled[(cfg.train.seed, 64)].starts(s, 8) for s in range(6, 12)])
    bounds = data.train.starts[1:-1]
    crossing = ((starts[:, None] < bounds) & (starts[:, None] + 64 >= bounds)).any(1)
    assert crossing.any()  # the resumed steps read windows that cross a shard boundary
    run_trainer(cfg, tmp_path / "cut", {}, stop_after=6)
    run_trainer(cfg, tmp_path / "cut", {}, resume=True)
    keys = ("step", "loss", "aux", "grad_norm", "tokens", "passes")
    rows = [[{k: r[k] for k in keys} for r in read_jsonl(d / "metrics.jsonl")] for d in (tmp_path / "full",
            tmp_path / "cut")]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 12
    n_train = len(data.train)
    assert rows[0][-1]["passes"] == rows[0][-1]["tokens"] / n_train > 0


def test_resume_on_changed_text_is_an_error_and_loses_nothing(cli, tmp_path):
    root = _corpus(tmp_path, n_files=12)
    out = tmp_path / "run"
    args = ["train", "tiny", "--no-progress", "--out", out, f"--data.corpus={root}", "--data.max_bytes=0",
            "--train.steps=4", "--train.ckpt_every=2", "--train.threads=1",
            "--evolve.diversify_steps=2"]  # fmt: skip
    rc, _, err = cli(*args)
    assert rc == 0, err
    data = json.loads((out / "data.json").read_text())
    assert data["corpus_kind"] == "dir" and len(data["content_sha256"]) == 64
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (root / "m03.py").write_text("# 3\nsomething else entirely\n" * 40)
    rc, _, err = cli(*[a for a in args if a != "--train.steps=4"], "--train.steps=8", "--resume")
    assert rc != 0 and "trained on other text than the corpus gives now" in err, err
    assert "start a new run directory" in err and "Traceback" not in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # checkpoints, logs, results, data.json: untouched
