"""The token cache: reuse, detection of stale and corrupt files, atomic writes, the cache directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evomoe.config import ConfigError, DataConfig
from evomoe.data.cache import load_or_build, resolve_cache_dir, write_atomic


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def text(self) -> str:
        return "\n".join(self)


def _cfg(root: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("tokenizer", "bpe")
    kw.setdefault("vocab_size", 300)
    return DataConfig(corpus=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_cache_built_once_then_reused(make_corpus, tmp_path):
    cfg = _cfg(make_corpus(), tmp_path)
    log1, log2 = Log(), Log()
    first = load_or_build(cfg, {}, log1)
    assert first.rebuilt and "building token cache" in log1.text()
    d = first.directory
    mtimes = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    second = load_or_build(cfg, {}, log2)
    assert not second.rebuilt and "using token cache" in log2.text() and "build" not in log2.text()
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == mtimes
    names = ["counts.npy", "manifest.json", "plan.npz", "tokenizer.json", "train-00000.bin", "val-00000.bin"]
    assert sorted(mtimes) == names  # no temp files left
    assert all(isinstance(p, np.memmap) for p in second.train.parts) and second.train.dtype == np.uint16
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)

    meta = json.loads((d / "manifest.json").read_text())
    assert d.name == meta["fingerprint"][:16] and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300
    shard = meta["shards"][0]
    assert shard["file"] == "train-00000.bin" and shard["tokens"] == meta["tokens"]["train"]
    assert (d / "train-00000.bin").stat().st_size == 2 * meta["tokens"]["train"] == shard["size"]
    assert meta["n_replaced"] == 0 and set(meta["text_bytes"]) == {"train", "val"}
    counts = np.bincount(np.asarray(second.train), minlength=300)
    assert np.array_equal(second.counts, counts)  # the stored histogram is the split's
    text = second.tokenizer.decode(np.asarray(second.val))
    assert len(text.encode()) == meta["text_bytes"]["val"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta", "tokenizer", "plan"])
def test_corrupt_cache_is_rebuilt(make_corpus, tmp_path, damage):
    cfg = _cfg(make_corpus(n_files=6, n_lines=30), tmp_path, tokenizer="bytes")
    good = load_or_build(cfg, {}, Log())
    d = good.directory
    train_ids, val_ids = np.array(good.train), np.array(good.val)
    del good
    whole = damage in ("meta", "tokenizer", "plan")  # a damaged shard is tokenized again on its own
    if damage == "flip":
        raw = bytearray((d / "train-00000.bin").read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (d / "train-00000.bin").write_bytes(bytes(raw))
        why = "train-00000.bin is corrupt"
    elif damage == "truncate":
        raw = (d / "val-00000.bin").read_bytes()
        (d / "val-00000.bin").write_bytes(raw[:-2])
        why = "val-00000.bin has"
    elif damage == "delete":
        (d / "train-00000.bin").unlink()
        why = "train-00000.bin is missing"
    elif damage == "meta":
        (d / "manifest.json").unlink()
        why = "no manifest.json"
    elif damage == "plan":
        (d / "plan.npz").write_bytes(b"x" * (d / "plan.npz").stat().st_size)
        why = "plan.npz is corrupt"
    else:
        (d / "tokenizer.json").write_text('{"kind": "bytes", "vocab_size": 257}\n')
        why = "tokenizer.json is corrupt"  # same size, other content
    log = Log()
    again = load_or_build(cfg, {}, log)
    assert again.rebuilt and "warning" in log.text() and why in log.text()
    assert ("rebuilding token cache" in log.text()) == whole
    assert np.array_equal(again.train, train_ids) and np.array_equal(again.val, val_ids)
    assert not load_or_build(cfg, {}, Log()).rebuilt


def test_changed_corpus_or_config_gets_a_new_cache(make_corpus, tmp_path):
    root = make_corpus(n_files=6, n_lines=30)
    cfg = _cfg(root, tmp_path, tokenizer="bytes")
    first = load_or_build(cfg, {}, Log())
    (root / "mod_001.py").write_text("changed = True\n" * 50)
    log = Log()
    second = load_or_build(cfg, {}, log)
    assert second.rebuilt and second.directory != first.directory and "building" in log.text()
    assert len(second.train) + len(second.val) != len(first.train) + len(first.val)
    other = load_or_build(_cfg(root, tmp_path, tokenizer="bytes", val_fraction=0.5), {}, Log())
    assert other.rebuilt and other.directory not in (first.directory, second.directory)


def test_stale_meta_with_other_fingerprint_is_rebuilt(make_corpus, tmp_path):
    cfg = _cfg(make_corpus(n_files=4, n_lines=20), tmp_path, tokenizer="bytes")
    d = load_or_build(cfg, {}, Log()).directory
    meta = json.loads((d / "manifest.json").read_text())
    meta["fingerprint"] = meta["fingerprint"][:16] + "0" * 48
    (d / "manifest.json").write_text(json.dumps(meta))
    log = Log()
    assert load_or_build(cfg, {}, log).rebuilt and "fingerprint differs" in log.text()


def test_resolve_cache_dir():
    assert resolve_cache_dir(DataConfig(cache_dir="/x/y"), {"EVOMOE_CACHE": "/e"}) == Path("/x/y")
    assert resolve_cache_dir(DataConfig(), {"EVOMOE_CACHE": "/e", "HOME": "/h"}) == Path("/e")
    assert resolve_cache_dir(DataConfig(), {"HOME": "/h"}) == Path("/h/.cache/evomoe")
    assert resolve_cache_dir(DataConfig(), {"EVOMOE_CACHE": ""}).name == "evomoe"


def test_unwritable_cache_dir_names_the_field(make_corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = DataConfig(
        corpus=str(make_corpus(n_files=3, n_lines=10)), tokenizer="bytes", cache_dir=str(blocker)
    )
    with pytest.raises(ConfigError, match="data.cache_dir"):
        load_or_build(cfg, {}, Log())


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    write_atomic(path, lambda fh: fh.write(b"old"))

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, boom)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
