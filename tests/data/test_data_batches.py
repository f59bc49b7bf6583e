"""load_token_data, training batches as a pure function of (seed, step), validation batches, bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomoe.config import ConfigError, DataConfig
from evomoe.data import TokenData, bits_per_byte, load_token_data


def quiet(msg: str) -> None:
    pass


@pytest.fixture
def bpe_data(make_corpus, tmp_path) -> TokenData:
    cfg = DataConfig(
        corpus=str(make_corpus(n_files=10, n_lines=80)), vocab_size=320, cache_dir=str(tmp_path / "c")
    )
    return load_token_data(cfg, seq_len=32, batch_size=4, env={}, log=quiet)


def test_train_batch_is_a_pure_function_of_seed_and_step(bpe_data, tmp_path):
    x, y = bpe_data.train_batch(step=7, seed=3, batch_size=4, seq_len=32)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    x2, y2 = bpe_data.train_batch(step=7, seed=3, batch_size=4, seq_len=32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, bpe_data.train_batch(step=8, seed=3, batch_size=4, seq_len=32)[0])
    assert not torch.equal(x, bpe_data.train_batch(step=7, seed=4, batch_size=4, seq_len=32)[0])

    # a fresh process (cache reloaded from disk) resumed at step 7 sees the same batch
    reloaded = load_token_data(
        DataConfig(corpus=bpe_data.meta["corpus"], vocab_size=320, cache_dir=str(tmp_path / "c")),
        seq_len=32,
        batch_size=4,
        env={},
        log=quiet,
    )
    assert not reloaded.rebuilt
    assert torch.equal(reloaded.train_batch(step=7, seed=3, batch_size=4, seq_len=32)[0], x)

    # every row is a contiguous window of the train split
    train = np.asarray(bpe_data.train, dtype=np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        starts = np.flatnonzero(
            np.all(
                np.lib.stride_tricks.sliding_window_view(train, 33) == np.concatenate([row_x, row_y[-1:]]),
                axis=1,
            )
        )
        assert starts.size >= 1


def test_train_batch_covers_the_split(bpe_data):
    n = len(bpe_data.train)
    seen = torch.cat([bpe_data.train_batch(s, 0, 4, 32)[0][:, 0] for s in range(50)])
    assert seen.unique().numel() > 20 and n > 4 * 33
    with pytest.raises(ValueError):
        bpe_data.train_batch(step=-1, seed=0, batch_size=1, seq_len=8)


def test_val_batches_are_fixed_and_spread(bpe_data):
    a = bpe_data.val_batches(n_batches=2, batch_size=2, seq_len=16)
    b = bpe_data.val_batches(n_batches=2, batch_size=2, seq_len=16)
    assert len(a) == 2 and all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )
    for x, y in a:
        assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    starts = bpe_data.val_starts(4, 16)
    assert starts[0] == 0 and starts[-1] == len(bpe_data.val) - 17
    assert (np.diff(starts) >= 16).all()  # windows do not overlap


def test_val_batches_shrink_on_a_small_split(bpe_data):
    n_fit = (len(bpe_data.val) - 1) // 32
    many = bpe_data.val_batches(n_batches=10_000, batch_size=2, seq_len=32)
    assert len(many) == n_fit // 2 >= 1
    one = bpe_data.val_batches(n_batches=3, batch_size=10_000, seq_len=32)
    assert len(one) == 1 and one[0][0].shape == (n_fit, 32)
    starts = bpe_data.val_starts(10_000, 32)
    assert (np.diff(starts) >= 32).all()


def test_target_bytes_and_bits_per_byte(bpe_data):
    x, y = bpe_data.train_batch(0, 0, 4, 32)
    n = bpe_data.target_bytes(y)
    assert n == sum(len(bpe_data.tokenizer.decode(row).encode()) for row in y.numpy())  # ASCII corpus
    assert n > y.numel()  # BPE tokens cover more than one byte on average
    assert bits_per_byte(n * math.log(2), n) == pytest.approx(1.0)
    assert 1.0 < bpe_data.bytes_per_token["train"] < 10.0


def test_bytes_tokenizer_data(make_corpus, tmp_path):
    cfg = DataConfig(
        corpus=str(make_corpus(n_files=5, n_lines=40)), tokenizer="bytes", cache_dir=str(tmp_path)
    )
    data = load_token_data(cfg, seq_len=16, batch_size=2, env={}, log=quiet)
    assert data.vocab_size == 256 and data.meta["tokens"]["train"] == data.meta["text_bytes"]["train"]
    _, y = data.train_batch(1, 1, 2, 16)
    assert data.target_bytes(y) == y.numel()


def test_corpus_smaller_than_one_batch(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("one line\nanother line\n" * 5)
    cfg = DataConfig(corpus=str(path), tokenizer="bytes", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="smaller than one batch") as e:
        load_token_data(cfg, seq_len=64, batch_size=8, env={}, log=quiet)
    assert "data.corpus" in str(e.value) and str(path) in str(e.value)


def test_stdlib_bpe_end_to_end(tmp_path):
    cfg = DataConfig(corpus="stdlib", max_bytes=300_000, vocab_size=512, cache_dir=str(tmp_path))
    data = load_token_data(cfg, seq_len=64, batch_size=8, env={}, log=quiet)
    assert data.vocab_size == 512 and data.meta["corpus_kind"] == "stdlib"
    assert data.meta["text_bytes"]["train"] + data.meta["text_bytes"]["val"] <= 300_000 + 1000
    x, _ = data.train_batch(0, 0, 8, 64)
    assert int(x.max()) < 512
    assert sum(data.meta["n_files"].values()) >= 2
