"""The sharded token pipeline: shards equal the in-memory path, dedup, a split that stays put, records
(JSONL, Parquet) and their errors, windows across shard boundaries, the shuffled order."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from data_corpus_gen import code_text

from evomoe.config import ConfigError, DataConfig
from evomoe.data import load_token_data
from evomoe.data.cache import load_or_build
from evomoe.data.corpus import read_corpus
from evomoe.data.tokenizer import train_tokenizer
from evomoe.data.tokens import ShardedTokens, ShuffledWindows


def quiet(msg: str) -> None:
    pass


def _cfg(root, tmp_path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 300)
    return DataConfig(corpus=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_shards_built_in_parallel_equal_the_in_memory_path(make_corpus, tmp_path):
    """Many small shards tokenized by two worker processes: the tokenizer and every token equal what the
    reference (the whole split read into memory, one tokenizer, one encode) gives."""
    root = make_corpus(n_files=24, n_lines=50)
    for i, path in enumerate(sorted(root.rglob("*.py"))):  # a safe seam between 2 of every 3 files only
        text = path.read_text()
        path.write_text(f"        {text}\n\n" if i % 3 == 0 else f"# module {i}\n{text}")
    cfg = _cfg(root, tmp_path, shard_bytes=4096, workers=2)
    logs: list[str] = []
    cached = load_or_build(cfg, {}, logs.append)
    assert len(cached.meta["shards"]) >= 4 and cached.meta["build"]["workers"] == 2
    assert len(cached.train.parts) >= 3  # windows cross shard boundaries
    text = read_corpus(cfg)
    tok = train_tokenizer("bpe", text.train_text, 300)
    assert cached.tokenizer.to_json() == tok.to_json()
    assert np.array_equal(np.asarray(cached.train), tok.encode(text.train_text))
    assert np.array_equal(np.asarray(cached.val), tok.encode(text.val_text))
    assert cached.meta["text_bytes"]["train"] == len(text.train_text.encode())
    assert cached.meta["forced_seams"] == 0
    plan = np.load(cached.directory / "plan.npz")
    docs, shards = plan["docs"], plan["shards"]
    seams = [int(a[3]) for a, b in zip(shards, shards[1:]) if a[0] == b[0]]  # inside a split
    assert seams and all(docs["clean_end"][hi - 1] and docs["clean_start"][hi] for hi in seams)
    assert "wrote token cache" in "\n".join(logs)


def test_a_shard_is_cut_anyway_where_no_seam_is_safe(tmp_path):
    """Files that all start with a space give no safe seam: the shard is cut past 4x its size, counted."""
    root = tmp_path / "ws"
    root.mkdir()
    rng = random.Random(5)
    for i in range(12):
        (root / f"f{i:02d}.py").write_text("    " + code_text(rng, 20))
    cached = load_or_build(_cfg(root, tmp_path, tokenizer="bytes", shard_bytes=1024), {}, quiet)
    assert cached.meta["forced_seams"] >= 1 and len(cached.meta["shards"]) >= 3
    assert np.array_equal(np.asarray(cached.train), np.frombuffer(read_corpus(
        _cfg(root, tmp_path, tokenizer="bytes")).train_text.encode(), np.uint8))  # fmt: skip


def test_exact_duplicates_removed_first_kept(make_corpus, tmp_path):
    root = make_corpus(n_files=8, n_lines=40)
    (root / "zz_copy.py").write_bytes((root / "mod_001.py").read_bytes())
    (root / "aa_copy.py").write_bytes((root / "mod_002.py").read_bytes())
    kept = load_or_build(_cfg(root, tmp_path, tokenizer="bytes", dedup=True), {}, quiet)
    every = load_or_build(_cfg(root, tmp_path, tokenizer="bytes"), {}, quiet)
    assert kept.meta["n_duplicates"] == 2 and every.meta["n_duplicates"] == 0
    total = sum(kept.meta["n_files"].values())
    assert total == 8 and sum(every.meta["n_files"].values()) == 10
    # the first in sorted order stays: aa_copy.py (not mod_002.py); zz_copy.py goes (mod_001.py stays)
    plan = np.load(kept.directory / "plan.npz")["docs"]
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    kept_names = {names[int(f)] for f in plan["file"]}
    assert "aa_copy.py" in kept_names and "mod_002.py" not in kept_names
    assert "mod_001.py" in kept_names and "zz_copy.py" not in kept_names


def _split_of(cached, root) -> dict[str, str]:
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    plan = np.load(cached.directory / "plan.npz")
    docs, shards = plan["docs"], plan["shards"]
    out = {}
    for split, _, lo, hi in shards:
        for f in docs["file"][lo:hi]:
            out[names[int(f)]] = "val" if split else "train"
    return out


def test_split_does_not_move_when_files_are_added(make_corpus, tmp_path):
    root = make_corpus(n_files=30, n_lines=10)
    cfg = _cfg(root, tmp_path, tokenizer="bytes", val_fraction=0.3)
    before = _split_of(load_or_build(cfg, {}, quiet), root)
    rng = random.Random(1)
    for i in range(20):
        path = root / "other" / f"new_{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(code_text(rng, 10))
    after = _split_of(load_or_build(cfg, {}, quiet), root)
    assert len(after) == len(before) + 20
    assert {k: after[k] for k in before} == before
    assert "val" in before.values() and "train" in before.values()


def _text(tokens) -> str:
    return bytes(np.asarray(tokens).astype(np.uint8)).decode()


def _write_jsonl(path, texts, field="text", extra_lines=()):
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({field: t, "id": len(t)}) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")


def test_jsonl_records_round_trip_and_split_by_text(tmp_path):
    rng = random.Random(0)
    texts = [code_text(rng, 5) for _ in range(60)]
    path = tmp_path / "corpus.jsonl"
    _write_jsonl(path, texts, extra_lines=["", json.dumps({"text": ""})])  # blank line, empty record
    cfg = _cfg(path, tmp_path, tokenizer="bytes", val_fraction=0.2, shard_bytes=1024, workers=1)
    data = load_token_data(cfg, seq_len=16, batch_size=2, env={}, log=quiet)
    n_val = sum(1 for t in texts if int.from_bytes(__import__("hashlib").sha1(t.encode()).digest()[:8], "big")
                % 10000 < 2000)  # fmt: skip
    assert data.meta["n_files"] == {"train": 60 - n_val, "val": n_val} and len(data.meta["shards"]) > 2
    val_text = _text(data.val)
    train_text = _text(data.train)
    for t in texts:  # every record whole, in file order, on exactly one side
        assert (t in val_text) != (t in train_text)
    order = [t for t in texts if t in train_text]
    assert train_text == "".join(order)
    # more records elsewhere in the file do not move these
    _write_jsonl(path, [code_text(rng, 5) for _ in range(10)] + texts)
    again = load_token_data(cfg, seq_len=16, batch_size=2, env={}, log=quiet)
    val2 = _text(again.val)
    assert all((t in val2) == (t in val_text) for t in texts)


def test_jsonl_missing_text_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, ["a = 1\n"] * 3, extra_lines=[json.dumps({"body": "x"})])
    where = r"data.text_field = 'text': '.*c\.jsonl' line 4: "
    with pytest.raises(ConfigError, match=where + r"has no field 'text' \(its fields: body\)"):
        load_or_build(_cfg(path, tmp_path, tokenizer="bytes"), {}, quiet)
    with pytest.raises(ConfigError, match="line 1: is not JSON"):
        (tmp_path / "bad.jsonl").write_text("{not json\n")
        load_or_build(_cfg(tmp_path / "bad.jsonl", tmp_path, tokenizer="bytes"), {}, quiet)


def test_parquet_records_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")  # a dependency of the project: never skipped after its install
    import pyarrow.parquet as pq

    rng = random.Random(2)
    texts = [code_text(rng, 4) for _ in range(40)]
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"content": texts[:25], "n": list(range(25))}), d / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"content": texts[25:], "n": list(range(15))}), d / "b.parquet", row_group_size=4)
    cfg = _cfg(d, tmp_path, tokenizer="bytes", extensions=".parquet", text_field="content", shard_bytes=512)
    data = load_token_data(cfg, seq_len=16, batch_size=2, env={}, log=quiet)
    both = _text(data.train) + _text(data.val)
    assert sorted(t for t in texts if t in both) == sorted(texts) and len(both) == len("".join(texts))
    with pytest.raises(ConfigError, match=r"has no column 'text' \(its columns: content, n\)"):
        load_or_build(_cfg(d, tmp_path, tokenizer="bytes", extensions=".parquet"), {}, quiet)


def test_sharded_tokens_read_across_boundaries():
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 1000, size=1000).astype(np.uint16)
    cuts = [0, 7, 8, 300, 301, 1000]
    tokens = ShardedTokens([flat[a:b] for a, b in zip(cuts, cuts[1:])])
    assert len(tokens) == 1000 and np.array_equal(np.asarray(tokens), flat)
    idx = np.array([[0, 6, 7, 8, 9], [299, 300, 301, 302, 999]])
    assert np.array_equal(tokens[idx], flat[idx])
    assert np.array_equal(tokens[5:310], flat[5:310])
    with pytest.raises(IndexError):
        tokens[np.array([1000])]


def test_shuffled_order_visits_every_window_once_per_pass():
    order = ShuffledWindows(n_tokens=1001, seq_len=10, seed=3)
    offset, n = order.windows(0)
    batch = 7
    first_pass = np.concatenate([order.starts(s, batch) for s in range(n // batch)])
    assert len(set(first_pass.tolist())) == len(first_pass)  # no window twice within a pass
    assert set(((first_pass - offset) % 10).tolist()) == {0}  # non-overlapping windows of the pass
    # a pure function of (seed, step): a fresh object, asked out of order, agrees
    again = ShuffledWindows(n_tokens=1001, seq_len=10, seed=3)
    assert np.array_equal(again.starts(30, batch), order.starts(30, batch))
    assert not np.array_equal(ShuffledWindows(1001, 10, seed=4).starts(0, batch), order.starts(0, batch))
    # the step that straddles the end of the pass takes the rest of pass 0, then pass 1
    s = n // batch
    straddle = order.starts(s, batch)
    rest = n - s * batch
    assert set(straddle[:rest].tolist()) == set(range(offset, offset + 10 * n, 10)) - set(first_pass.tolist())


def test_shuffled_batches_through_token_data(make_corpus, tmp_path):
    cfg = _cfg(make_corpus(n_files=10, n_lines=40), tmp_path, tokenizer="bytes", order="shuffled")
    data = load_token_data(cfg, seq_len=32, batch_size=4, env={}, log=quiet)
    x, y = data.train_batch(step=5, seed=1, batch_size=4, seq_len=32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = np.asarray(data.train, dtype=np.int64)
    starts = data._shuffled[(1, 32)].starts(5, 4)
    assert np.array_equal(x.numpy(), train[starts[:, None] + np.arange(32)])
    assert data.passes(len(data.train)) == 1.0
