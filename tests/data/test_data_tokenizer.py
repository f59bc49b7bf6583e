"""Byte and byte-level BPE tokenizers: round trips, vocabulary size, bytes per token, save/load."""

from __future__ import annotations

import random

import numpy as np
import pytest
from data_corpus_gen import code_text

from evomoe.config import ConfigError
from evomoe.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    iter_chunks,
    load_tokenizer,
    train_tokenizer,
)

ODD = "naïve café — 日本語 🐍\ttab\r\nwindows  trailing  \n\n\n    indented\x0c\n"


@pytest.fixture(scope="module")
def train_text() -> str:
    return code_text(random.Random(1), 3000) + ODD


@pytest.fixture(scope="module")
def bpe(train_text: str) -> BPETokenizer:
    return BPETokenizer.train(train_text, vocab_size=400)


def test_bytes_round_trip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(ODD)
    assert ids.dtype == np.int64 and ids.tolist() == list(ODD.encode("utf-8"))
    assert tok.decode(ids) == ODD and tok.vocab_size == 256
    assert (tok.token_bytes == 1).all() and tok.token_bytes.shape == (256,)
    assert tok.encode(ODD, dtype=np.uint16).dtype == np.uint16
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_trains_and_round_trips(bpe, train_text):
    assert bpe.vocab_size == 400
    unseen = "print('héllo wörld ✓ 𝛼')  # never in the training text\n"
    for text in (train_text, unseen, "", ODD):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert len(bpe.encode(train_text)) < len(train_text.encode()) / 2  # it actually compresses


def test_bpe_vocab_is_at_most_the_request():
    tok = BPETokenizer.train("tiny text\n" * 3, vocab_size=4096)
    assert 256 <= tok.vocab_size < 4096
    assert int(tok.token_bytes[tok.encode("tiny text\n")].sum()) == 10


def test_bpe_token_bytes_match_each_token(bpe):
    # a single token can be a fragment of a UTF-8 character: count its bytes, not its decoded chars
    assert bpe.token_bytes.shape == (bpe.vocab_size,)
    assert (bpe.token_bytes[:256] == 1).all() and (bpe.token_bytes >= 1).all()
    ids = bpe.encode("日本語")
    assert int(bpe.token_bytes[ids].sum()) == 9


def test_chunked_encoding_equals_whole_text(bpe, train_text):
    chunks = list(iter_chunks(train_text, size=500))
    assert len(chunks) > 20 and "".join(chunks) == train_text
    whole = bpe._tok.encode(train_text).ids
    assert bpe.encode(train_text).tolist() == whole
    pieces = [i for c in chunks for i in bpe._tok.encode(c).ids]
    assert pieces == whole


def test_bpe_save_load_and_determinism(bpe, train_text, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == bpe.vocab_size
    assert np.array_equal(loaded.encode(ODD), bpe.encode(ODD))
    assert np.array_equal(loaded.token_bytes, bpe.token_bytes)
    assert BPETokenizer.train(train_text, vocab_size=400).to_json() == bpe.to_json()


def test_load_errors_and_bad_kind(tmp_path):
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        train_tokenizer("wordpiece", "x", 300)
