"""A model's own tokenizer (``PretrainedTokenizer``): lossless, bytes per id add up to the text's UTF-8
bytes, and a token cache stores and reloads it (kind ``pretrained``)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from evomoe.data.tokenizer import PretrainedTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x + 1  # café\n"


def byte_level(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator([TEXT] * 10, trainer=trainer)
    tok.save(str(path))
    return path


def test_pretrained_tokenizer_round_trip_and_bytes(tmp_path):
    tok = PretrainedTokenizer.from_file(byte_level(tmp_path / "tokenizer.json"))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert int(tok.token_bytes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert tok.token_bytes[tok.token_id("<eos>")] == 0  # special tokens stand for no text
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == "pretrained" and np.array_equal(again.encode(TEXT), ids)
