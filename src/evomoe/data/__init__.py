"""Corpus, tokenizer, token cache and batches.

``load_token_data(cfg.data, seq_len, batch_size)`` is the one call a trainer needs: it finds the corpus,
reuses or (re)builds the token cache, and returns a :class:`TokenData` whose ``train_batch(step, seed,
...)`` is a pure function of (seed, step) and whose ``val_batches(...)`` is a fixed list.
"""

from __future__ import annotations

from .batches import TokenData, bits_per_byte, load_token_data
from .cache import CachedTokens, load_or_build, resolve_cache_dir
from .corpus import CorpusListing, CorpusText, list_corpus, read_corpus
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_tokenizer
from .tokens import ShardedTokens

build_corpus = read_corpus

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CachedTokens",
    "CorpusListing",
    "CorpusText",
    "TokenData",
    "ShardedTokens",
    "Tokenizer",
    "bits_per_byte",
    "build_corpus",
    "list_corpus",
    "load_or_build",
    "load_token_data",
    "load_tokenizer",
    "read_corpus",
    "resolve_cache_dir",
    "train_tokenizer",
]
