"""Tokenizers: raw UTF-8 bytes, or a byte-level BPE trained with the ``tokenizers`` library.

Both map any text to ids and back without loss, and both expose ``token_bytes``: how many UTF-8 bytes
each id stands for, so that a summed loss in nats converts to bits per byte.

Large texts are cut into ~64 KB chunks after a newline that has a non-space character on both sides.
At such a point the byte-level pre-tokenizer (GPT-2's regex) splits the whole text too, so chunked
encoding gives exactly the ids of encoding the text in one piece.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers as hf
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from ..config import ConfigError

TOKENIZER_FILE = "tokenizer.json"
CHUNK_CHARS = 1 << 16
ENCODE_BATCH = 16  # chunks per encode_batch call: bounds the memory of the Encoding objects
_CHUNK_BREAK = re.compile(r"(?<=\S)\n(?=\S)")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def token_bytes(self) -> np.ndarray: ...

    def encode(self, text: str, dtype: type = np.int64) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def to_json(self) -> str: ...

    def save(self, directory: str | Path) -> Path: ...


def iter_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Consecutive pieces of ``text`` of about ``size`` chars, cut only after a newline between non-spaces."""
    pos, n = 0, len(text)
    while pos < n:
        if n - pos <= size:
            yield text[pos:]
            return
        m = _CHUNK_BREAK.search(text, pos + size)
        end = n if m is None else m.end()
        yield text[pos:end]
        pos = end


class ByteTokenizer:
    """Ids are the UTF-8 bytes of the text: vocabulary 256, every id one byte."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def encode(self, text: str, dtype: type = np.int64) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)

    def encode_lines(self, lines: Sequence[str]) -> list[np.ndarray]:
        """Each line's ids (short texts: sentences of a parallel corpus)."""
        return [self.encode(line) for line in lines]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "vocab_size": 256}) + "\n"

    def hf_json(self) -> str:
        """The same ids as a ``tokenizers`` JSON (transformers loads it): a byte-level BPE without merges,
        whose 256 pieces are the bytes in order."""
        tok = hf.Tokenizer(models.BPE(vocab=byte_level_map(), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def byte_level_map() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table used by the ByteLevel pre-tokenizer."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def encode_chunked(tok: hf.Tokenizer, text: str, dtype: type = np.int64) -> np.ndarray:
    """Ids of ``text`` without special tokens, encoded in chunks (bounded memory)."""
    chunks = list(iter_chunks(text))
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts: list[np.ndarray] = []
    for i in range(0, len(chunks), ENCODE_BATCH):
        for enc in encode_batch(chunks[i : i + ENCODE_BATCH], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class _WrappedTokenizer:
    """What the tokenizers built on a ``tokenizers.Tokenizer`` (``self._tok``) share."""

    _tok: hf.Tokenizer
    _token_bytes: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def token_bytes(self) -> np.ndarray:
        return self._token_bytes

    def encode(self, text: str, dtype: type = np.int64) -> np.ndarray:
        return encode_chunked(self._tok, text, dtype)


class BPETokenizer(_WrappedTokenizer):
    """A byte-level BPE (``tokenizers`` library) with no special tokens and no added prefix space."""

    kind = "bpe"

    def __init__(self, tok: hf.Tokenizer) -> None:
        self._tok = tok
        self._token_bytes = self._count_token_bytes()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Train on ``text`` (the training split); the vocabulary may come out smaller on little text."""
        return cls.train_on(iter_chunks(text), vocab_size)

    @classmethod
    def train_on(cls, chunks: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on the pieces of a text cut at points where its pre-tokenization does not change
        (``iter_chunks``): the same merges as training on the whole text, without holding it."""
        tok = hf.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok)

    def _count_token_bytes(self) -> np.ndarray:
        inv = byte_level_map()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or any(c not in inv for c in piece):
                raise ValueError(f"token id {i} ({piece!r}) is not a byte-level token")
            out[i] = len(piece)  # one char of the byte-level alphabet per byte
        return out

    def encode_lines(self, lines: Sequence[str]) -> list[np.ndarray]:
        """Each line's ids, in one batched call (short texts: sentences of a parallel corpus)."""
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [
            np.asarray(e.ids, dtype=np.int64) for e in encode_batch(list(lines), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    hf_json = to_json  # it is a ``tokenizers`` JSON already

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


SPECIALS = ("<pad>", "<mask>", "<s>", "</s>")
MASK = "<mask>"


class SpecialTokens:
    """A tokenizer plus the special tokens ``<pad>``, ``<mask>``, ``<s>``, ``</s>`` (masked LM, translation).

    The specials take the ids just past the base vocabulary, so the base ids (and the LM's token cache)
    are unchanged. Text never encodes to a special (``"<pad>"`` in a text is its ordinary pieces); the
    specials stand for no bytes and ``decode`` leaves them out. Works the same over bytes and BPE.
    """

    def __init__(self, base: Tokenizer) -> None:
        self.base = base
        self.kind = base.kind
        n = base.vocab_size
        self.pad_id, self.mask_id, self.bos_id, self.eos_id = n, n + 1, n + 2, n + 3

    @property
    def num_normal(self) -> int:
        """Ids [0, num_normal) are text pieces; the specials follow."""
        return self.base.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(SPECIALS)

    @property
    def token_bytes(self) -> np.ndarray:
        return np.concatenate([self.base.token_bytes, np.zeros(len(SPECIALS), dtype=np.int64)])

    def encode(self, text: str, dtype: type = np.int64) -> np.ndarray:
        return self.base.encode(text, dtype)

    def encode_lines(self, lines: Sequence[str]) -> list[np.ndarray]:
        return self.base.encode_lines(lines)

    @property
    def mask_takes_space(self) -> bool:
        """Over a BPE a ``<mask>`` in a prompt takes the whitespace before it, as RoBERTa's does: the pieces
        carry their leading space, so ``x = <mask>`` asks for `` 1``, not ``1`` after a lone space."""
        return self.base.kind != "bytes"

    def encode_with_masks(self, text: str) -> np.ndarray:
        """Ids of a prompt in which each literal ``<mask>`` is the mask token (the rest is text)."""
        pieces = text.split(MASK)
        parts: list[np.ndarray] = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            parts.append(self.encode(piece if last or not self.mask_takes_space else piece.rstrip()))
            if not last:
                parts.append(np.array([self.mask_id]))
        return np.concatenate(parts).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return self.base.decode(ids[ids < self.num_normal])

    def hf_json(self) -> str:
        """The base tokenizer's ``tokenizers`` JSON with the specials added at their ids (what transformers
        loads; ``<mask>`` in a text then is the mask token, see ``mask_takes_space``)."""
        tok = hf.Tokenizer.from_str(self.base.hf_json())
        lstrip = {MASK: self.mask_takes_space}
        tok.add_special_tokens([AddedToken(t, lstrip=lstrip.get(t, False), special=True) for t in SPECIALS])
        ids = [tok.token_to_id(t) for t in SPECIALS]
        if ids != [self.pad_id, self.mask_id, self.bos_id, self.eos_id]:  # pragma: no cover - invariant
            raise ValueError(f"special tokens got ids {ids} in the tokenizers JSON")
        return tok.to_str()

    def to_json(self) -> str:
        return (
            json.dumps({"kind": "specials", "specials": list(SPECIALS), "base": self.base.to_json()}) + "\n"
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


class PretrainedTokenizer(_WrappedTokenizer):
    """A model's own tokenizer (a ``tokenizer.json`` of the ``tokenizers`` library: byte-level BPE as in
    GPT-2/Qwen2, or SentencePiece-style with byte fallback as in Llama). Text is encoded without special
    tokens. ``token_bytes`` counts the UTF-8 bytes each id stands for (special tokens: 0)."""

    kind = "pretrained"

    def __init__(self, tok: hf.Tokenizer, source: str = "") -> None:
        self._tok, self.source = tok, source
        self._token_bytes = count_token_bytes(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> PretrainedTokenizer:
        """ValueError naming the file when it is missing or not a ``tokenizers`` JSON."""
        try:
            return cls(hf.Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise ValueError(f"cannot load tokenizer '{path}': {str(e).splitlines()[0][:200]}") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())}) + "\n"

    def hf_json(self) -> str:
        """The ``tokenizer.json`` the ``tokenizers`` library (and ``transformers``) reads."""
        return self._tok.to_str()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def count_token_bytes(tok: hf.Tokenizer) -> np.ndarray:
    """UTF-8 bytes per id: byte-level pieces count one per char, ``<0xNN>`` one, ``▁`` a space."""
    inv = byte_level_map()
    byte_level = '"ByteLevel"' in json.dumps(json.loads(tok.to_str()).get("decoder"))
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for i in range(out.size):
        piece = tok.id_to_token(i)
        if piece is None or piece in special:
            continue
        if _BYTE_FALLBACK.match(piece):
            out[i] = 1
        elif byte_level and all(c in inv for c in piece):
            out[i] = len(piece)
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def train_tokenizer(kind: str, train_text: str, vocab_size: int) -> Tokenizer:
    """A tokenizer of ``kind`` (``data.tokenizer``), trained on the training text when it is a BPE."""
    return train_tokenizer_on(kind, iter_chunks(train_text), vocab_size)


def train_tokenizer_on(kind: str, chunks: Iterable[str], vocab_size: int) -> Tokenizer:
    """``train_tokenizer`` on a text given as safely cut pieces (streamed from the shards)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train_on(chunks, vocab_size)
    raise ConfigError(f"data.tokenizer = {kind!r}: choose from: bpe, bytes")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what :meth:`save` wrote into ``directory``; ValueError when it is missing or malformed."""
    path = Path(directory) / TOKENIZER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load tokenizer '{path}': {e}") from None
    return tokenizer_from_json(data, path)


def tokenizer_from_json(data: object, path: str | Path = "<json>") -> Tokenizer:
    if isinstance(data, dict) and data.get("kind") == "bytes":
        return ByteTokenizer()
    if isinstance(data, dict) and data.get("kind") == "specials":
        if tuple(data.get("specials", ())) != SPECIALS:
            raise ValueError(f"cannot load tokenizer '{path}': special tokens {data.get('specials')}")
        return SpecialTokens(tokenizer_from_json(json.loads(data["base"]), path))
    if isinstance(data, dict) and data.get("kind") == "pretrained":
        try:
            return PretrainedTokenizer(hf.Tokenizer.from_str(json.dumps(data["tokenizer"])), str(path))
        except Exception as e:
            raise ValueError(f"cannot load tokenizer '{path}': {e}") from None
    try:
        return BPETokenizer(hf.Tokenizer.from_str(json.dumps(data)))
    except Exception as e:  # the Rust side raises plain Exception on malformed files
        raise ValueError(f"cannot load tokenizer '{path}': {e}") from None
