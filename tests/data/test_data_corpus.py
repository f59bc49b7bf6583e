"""Corpus listing, fingerprints, reading and the per-file train/validation split."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evomoe.config import ConfigError, DataConfig
from evomoe.data.corpus import (
    decode_counting,
    is_val_file,
    list_corpus,
    read_corpus,
    split_names,
    stdlib_root,
)


def test_split_is_deterministic_and_disjoint_by_file(make_corpus):
    root = make_corpus(n_files=40, n_lines=5)
    cfg = DataConfig(corpus=str(root), val_fraction=0.2)
    a, b = read_corpus(cfg), read_corpus(cfg)
    assert a == b
    assert set(a.train_files).isdisjoint(a.val_files)
    all_rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    assert sorted(a.train_files + a.val_files) == all_rels
    assert a.n_files_train == len(a.train_files) > 0 and a.n_files_val == len(a.val_files) > 0
    assert all(is_val_file(r, 0.2) for r in a.val_files)
    assert a.fingerprint == list_corpus(cfg).fingerprint

    (root / "zz_new.py").write_text("x = 1\n")  # a new file never moves the others
    c = read_corpus(cfg)
    assert set(a.val_files) <= set(c.val_files) and set(a.train_files) <= set(c.train_files)
    assert c.fingerprint != a.fingerprint


def test_split_never_leaves_a_side_empty():
    rels = [f"f{i}.py" for i in range(5)]
    train, val = split_names(rels, 1e-9)  # nothing hashes to val: the last file moves there
    assert val == [rels[-1]] and train == rels[:-1]
    train, val = split_names(rels, 0.9999999)
    assert train and val and sorted(train + val) == rels


def test_single_file_is_split_by_bytes_on_a_line(tmp_path):
    path = tmp_path / "one.txt"
    text = "".join(f"line {i} ünïcode\n" for i in range(100))
    path.write_text(text, encoding="utf-8")
    out = read_corpus(DataConfig(corpus=str(path), val_fraction=0.1))
    assert out.train_text + out.val_text == text
    assert out.train_text.endswith("\n") and out.val_text.startswith("line ")
    assert 0.85 < len(out.train_text.encode()) / len(text.encode()) < 0.95
    assert (out.n_files_train, out.n_files_val) == (1, 1)


def test_stdlib_corpus_found_and_nonempty():
    cfg = DataConfig(corpus="stdlib", max_bytes=300_000)
    listing = list_corpus(cfg)
    assert listing.kind == "stdlib" and listing.root == stdlib_root()
    rels = [f.rel for f in listing.files]
    assert rels == sorted(rels) and all(r.endswith(".py") for r in rels)
    assert sum(f.limit if f.limit is not None else f.size for f in listing.files) == 300_000
    text = read_corpus(cfg, listing)
    assert len(text.train_text) > 100_000 and text.val_text and text.n_files_val >= 1

    full = list_corpus(DataConfig(corpus="stdlib"))
    parts = {p for f in full.files for p in f.rel.split("/")[:-1]}
    assert len(full.files) > 200
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def test_max_bytes_keeps_a_sorted_prefix(make_corpus):
    root = make_corpus(n_files=10, n_lines=20)
    full = list_corpus(DataConfig(corpus=str(root)))
    budget = full.files[0].size + full.files[1].size + 100
    part = list_corpus(DataConfig(corpus=str(root), max_bytes=budget))
    assert [f.rel for f in part.files] == [f.rel for f in full.files[:3]]
    assert part.files[2].limit == 100 and part.fingerprint != full.fingerprint
    text = read_corpus(DataConfig(corpus=str(root), max_bytes=budget))
    assert len((text.train_text + text.val_text).encode()) <= budget + 3  # + a newline per file


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    assert decode_counting(b"ok\n") == ("ok\n", 0)
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_bytes(b"abc \xff\xfe def\n" + b"x = '\xe2\x82'\n")
    (root / "b.txt").write_bytes("fine ü\n".encode())
    out = read_corpus(DataConfig(corpus=str(root)))
    assert out.n_replaced == 4
    assert "\ufffd" in out.train_text + out.val_text


def test_binary_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(3):
        (root / f"t{i}.txt").write_text(f"text {i}\n" * 10)
    (root / "blob.txt").write_bytes(b"\x00\x01\x02 binary")
    out = read_corpus(DataConfig(corpus=str(root)))
    assert out.n_binary_skipped == 1
    assert "blob.txt" not in out.train_files + out.val_files
    assert "binary" not in out.train_text + out.val_text


def test_extensions_and_hidden_dirs(tmp_path):
    root = tmp_path / "c"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "x.py").write_text("hidden\n")
    (root / "a.py").write_text("a\n")
    (root / "b.MD").write_text("b\n")
    (root / "c.bin").write_text("c\n")
    listing = list_corpus(DataConfig(corpus=str(root), extensions="py, md"))
    assert [f.rel for f in listing.files] == ["a.py", "b.MD"]


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="data.corpus") as e:
        list_corpus(DataConfig(corpus=str(missing)))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_empty_directory_and_no_text(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="data.corpus.*empty"):
        list_corpus(DataConfig(corpus=str(empty)))
    (empty / "data.bin").write_bytes(b"xx")  # wrong suffix
    (empty / "zero.py").write_text("")  # no bytes
    with pytest.raises(ConfigError, match="empty"):
        list_corpus(DataConfig(corpus=str(empty)))
    (empty / "nul.py").write_bytes(b"\x00\x00")
    with pytest.raises(ConfigError, match="no text"):
        read_corpus(DataConfig(corpus=str(empty)))
    with pytest.raises(ConfigError, match="data.extensions"):
        list_corpus(DataConfig(corpus=str(empty), extensions=" , "))


def test_unreadable_file_names_the_path(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.py").write_text("a = 1\n")
    os.symlink(tmp_path / "gone.py", root / "dangling.py")
    with pytest.raises(ConfigError, match="data.corpus") as e:
        list_corpus(DataConfig(corpus=str(root)))
    assert "dangling.py" in str(e.value)


def test_fingerprint_tracks_config_and_content(make_corpus):
    root = make_corpus(n_files=4, n_lines=5)
    base = list_corpus(DataConfig(corpus=str(root))).fingerprint
    assert list_corpus(DataConfig(corpus=str(root))).fingerprint == base
    assert list_corpus(DataConfig(corpus=str(root), tokenizer="bytes")).fingerprint != base
    assert list_corpus(DataConfig(corpus=str(root), vocab_size=300)).fingerprint != base
    assert list_corpus(DataConfig(corpus=str(root), val_fraction=0.3)).fingerprint != base
    f = next(Path(root).rglob("*.py"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert list_corpus(DataConfig(corpus=str(root))).fingerprint != base
