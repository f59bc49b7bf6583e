"""Special tokens (<pad>, <mask>, <s>, </s>) over both tokenizers: ids past the base vocabulary, never
produced by text, zero bytes, left out by decode, and saved / loaded with the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from evomoe.data.tokenizer import BPETokenizer, ByteTokenizer, SpecialTokens, load_tokenizer

TEXT = "def f(x):\n    return x + 1  # <mask> <pad> é\n" * 30


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_specials(kind, tmp_path):
    base = ByteTokenizer() if kind == "bytes" else BPETokenizer.train(TEXT, 300)
    tok = SpecialTokens(base)
    n = base.vocab_size
    assert (tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == n + 4 and tok.num_normal == n
    ids = tok.encode(TEXT)
    assert ids.max() < n  # "<mask>" in text is ordinary text
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == TEXT
    assert tok.token_bytes.shape == (n + 4,) and tok.token_bytes[n:].sum() == 0
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, SpecialTokens) and back.vocab_size == tok.vocab_size
    assert np.array_equal(back.encode(TEXT), ids)
