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


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_masks_in_a_prompt_and_the_tokenizers_json(kind):
    """``encode_with_masks`` turns each literal <mask> into the mask id; the exported ``tokenizers`` JSON
    (what transformers loads) gives the same ids, specials included, and the same text back."""
    from tokenizers import Tokenizer

    base = ByteTokenizer() if kind == "bytes" else BPETokenizer.train(TEXT, 300)
    tok = SpecialTokens(base)
    prompt = "def <mask>(x):\n    return <mask> + 1 é"
    ids = tok.encode_with_masks(prompt).tolist()
    assert ids.count(tok.mask_id) == 2 and max(i for i in ids if i != tok.mask_id) < tok.num_normal
    before = prompt.split("<mask>")[0]
    # over a BPE the mask takes the space before it (its tokens carry their leading space), over bytes not
    want_before = before.rstrip() if kind == "bpe" else before
    assert ids[: ids.index(tok.mask_id)] == tok.encode(want_before).tolist()
    hf = Tokenizer.from_str(tok.hf_json())
    assert hf.get_vocab_size() == tok.vocab_size
    assert hf.encode(prompt, add_special_tokens=False).ids == ids
    text = "plain text é\n    indented"
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text).tolist()
    assert hf.decode(tok.encode(text).tolist()) == text
    assert [hf.token_to_id(t) for t in ("<pad>", "<mask>", "<s>", "</s>")] == [
        tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id
    ]  # fmt: skip
