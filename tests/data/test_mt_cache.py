"""The translation cache: reused when intact, rebuilt with a message when a file is damaged."""

from __future__ import annotations

import numpy as np
import pytest

from evomoe.config import DataConfig
from evomoe.data.mt_data import load_mt_data


def _load(tmp_path, log):
    return load_mt_data(
        "synthetic", "", synthetic=(200, 30, 6, 0), val_fraction=0.1, max_tokens=32,
        data=DataConfig(tokenizer="bytes", cache_dir=str(tmp_path)), env={}, log=log,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["pairs.npz", "tokenizer.json"])
def test_damaged_translation_cache_is_rebuilt(tmp_path, name):
    first = _load(tmp_path, lambda s: None)
    directory = next(tmp_path.glob("mt-*"))
    raw = bytearray((directory / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (directory / name).write_bytes(bytes(raw))
    logs: list[str] = []
    again = _load(tmp_path, logs.append)
    assert any(f"rebuilding translation cache {directory}: {name} is corrupt" in m for m in logs), logs
    assert all(np.array_equal(a, b) for a, b in zip(first.train_src, again.train_src))
    logs.clear()
    _load(tmp_path, logs.append)
    assert not any("rebuilding" in m for m in logs)
