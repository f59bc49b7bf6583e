"""Parallel corpora: misaligned files are an error naming both, empty pairs are counted, the split is
stable, the generated transduction is deterministic, and SWORD Bibles are aligned by verse label."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from evomoe.config import ConfigError, DataConfig
from evomoe.data.bucketing import fixed_batches, make_buckets, pair_batch, sample_indices
from evomoe.data.mt_data import load_mt_data
from evomoe.data.parallel import read_parallel, split_pairs
from evomoe.data.sword import align_modules, plain_text
from evomoe.data.synthetic import generate_pairs


def test_misaligned_files_name_both(tmp_path: Path):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "b.txt").write_text("uno\ndos\n")
    with pytest.raises(ConfigError) as e:
        read_parallel(tmp_path / "a.txt", tmp_path / "b.txt")
    msg = str(e.value)
    assert "a.txt" in msg and "b.txt" in msg and "3 lines" in msg and "has 2" in msg


def test_empty_lines_counted(tmp_path: Path):
    (tmp_path / "a.txt").write_text("one\n\nthree\n  \n")
    (tmp_path / "b.txt").write_text("uno\ndos\n\ncuatro\n")
    text = read_parallel(tmp_path / "a.txt", tmp_path / "b.txt")
    assert text.source == ["one"] and text.target == ["uno"]
    assert text.n_read == 4 and text.n_empty == 3
    assert "3 dropped for an empty side" in text.describe()


def test_split_is_stable_and_covers():
    text = generate_pairs(500, seed=1)
    train, val = split_pairs(text, 0.1)
    assert sorted(train + val) == list(range(len(text))) and 20 < len(val) < 90
    more = generate_pairs(600, seed=1)  # same first 500 pairs, 100 more
    train2, val2 = split_pairs(more, 0.1)
    assert [i for i in val2 if i < 500] == val


def test_synthetic_is_deterministic_and_a_transduction():
    a, b = generate_pairs(50, seed=3), generate_pairs(50, seed=3)
    assert a.source == b.source and a.target == b.target
    assert a.source != generate_pairs(50, seed=4).source
    lexicon = {}
    for s, t in zip(a.source, a.target):
        sw, tw = s.split(), t.split()
        assert len(sw) == len(tw)
        for x, y in zip(sw, reversed(tw)):
            assert lexicon.setdefault(x, y) == y  # one consistent dictionary, reversed order


def test_buckets_batches_pure_and_padded():
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 9, size=n) for n in rng.integers(1, 20, size=200)]
    tgt = [rng.integers(0, 9, size=n) for n in rng.integers(1, 20, size=200)]
    lengths = np.array([max(len(s), len(t)) for s, t in zip(src, tgt)])
    buckets = make_buckets(lengths, 4)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(200))
    idx = sample_indices(buckets, seed=2, step=5, batch_size=8)
    assert np.array_equal(idx, sample_indices(buckets, seed=2, step=5, batch_size=8))
    assert any(set(idx) <= set(b.tolist()) for b in buckets)  # one bucket per batch
    pb = pair_batch(src, tgt, idx, pad_id=99, bos=97, eos=98)
    for row, i in enumerate(idx):
        n, m = len(src[i]), len(tgt[i])
        assert pb.src_valid_BS[row].sum() == n and (pb.src_BS[row, n:] == 99).all()
        assert pb.tgt_in_BT[row, 0] == 97 and pb.tgt_out_BT[row, m] == 98
        assert pb.tgt_in_BT[row, 1 : m + 1].tolist() == pb.tgt_out_BT[row, :m].tolist() == tgt[i].tolist()
    val = fixed_batches(lengths, 16, 3)
    assert sum(len(b) for b in val) == 48


# ------------------------------------------------------------------------------ SWORD (generated module)
def write_ztext(root: Path, name: str, slots: dict[str, list[str]]) -> None:
    data = root / "modules" / "texts" / "ztext" / name
    data.mkdir(parents=True)
    (root / "mods.d").mkdir(exist_ok=True)
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./modules/texts/ztext/{name}/\nModDrv=zText\nEncoding=UTF-8\n"
    )
    for testament, texts in slots.items():
        raw = [t.encode() for t in texts]
        half = len(raw) // 2  # two blocks
        blocks = [b"".join(raw[:half]), b"".join(raw[half:])]
        bzz, bzs = b"", b""
        for blk in blocks:
            comp = zlib.compress(blk)
            bzs += struct.pack("<III", len(bzz), len(comp), len(blk))
            bzz += comp
        bzv, off = b"", 0
        for i, r in enumerate(raw):
            if i == half:
                off = 0
            bzv += struct.pack("<IIH", 0 if i < half else 1, off, len(r))
            off += len(r)
        for ext, content in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
            (data / f"{testament}.{ext}").write_bytes(content)


def test_sword_modules_aligned_by_verse(tmp_path: Path):
    book = '<div type="book" osisID="Gen" sID="g1"/>'
    ch = lambda c: f'<chapter n="1" osisID="{c}" sID="{c}"/>'  # noqa: E731
    en = [
        "",
        "",
        book,
        ch("Gen.1"),
        '<w lemma="x">In</w> the beginning<note>fn</note>.',
        "Light &amp; dark",
        ch("Gen.2"),
        "Rest.",
        "Extra verse only here.",
    ]
    es = ["", "", book, ch("Gen.1"), "En el principio.", "Luz y tinieblas", ch("Gen.2"), "Descanso.", ""]
    write_ztext(tmp_path, "EN", {"ot": en})
    write_ztext(tmp_path, "ES", {"ot": es})
    text = align_modules("EN", "ES", env={"SWORD_PATH": str(tmp_path)})
    assert text.source == ["In the beginning.", "Light & dark", "Rest."]
    assert text.target == ["En el principio.", "Luz y tinieblas", "Descanso."]
    assert text.n_read == 4 and text.n_empty == 1  # Gen.2.2 is empty in ES
    with pytest.raises(ConfigError, match="not installed"):
        align_modules("EN", "FR", env={"SWORD_PATH": str(tmp_path)})


def test_plain_text_strips_markup():
    assert plain_text('<w a="1">God</w><note n="x">a note</note><w>created</w> , it') == "God created, it"


def test_log_counts_the_length_drop_as_not_kept(tmp_path: Path):
    """read = kept + dropped for an empty side + dropped for length: 'kept' is what training sees."""
    short = [f"w{i} x" for i in range(40)]
    src = short + ["y" * 30] * 5 + ["", "z", " "]  # 5 over max_tokens=20 bytes, 3 with an empty side
    tgt = short + ["t"] * 5 + ["a", "", "b"]
    (tmp_path / "a.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(tgt) + "\n")
    logs: list[str] = []
    data = DataConfig(tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    mt = load_mt_data(
        str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), synthetic=(0, 0, 0, 0), val_fraction=0.2,
        max_tokens=20, data=data, env={}, log=logs.append,
    )  # fmt: skip
    assert len(mt.train_src) + len(mt.val_src) == 40
    line = next(s for s in logs if "pairs read" in s)
    assert "48 pairs read, 40 kept, 3 dropped for an empty side, 5 for a side over the length limit" in line
