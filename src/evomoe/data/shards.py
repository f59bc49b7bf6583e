"""The shard plan and the shard workers: documents -> deduplicated, split, tokenized shards.

A plan orders the kept documents (train first, then validation, each in corpus order) and cuts each split
into shards of about ``data.shard_bytes`` of text, only where the joined text may be cut without changing
its tokens (a document that ends with a non-space character before its newline, followed by one that
starts with a non-space character). So the shards' tokens, concatenated, equal the tokens of the whole
split encoded in one piece: the in-memory path of ``corpus.read_corpus`` is the reference. Where no such
seam comes within 4x the shard size (rare: whitespace at every file edge) the shard is cut anyway and the
seam is counted in the manifest (``forced_seams``).

The workers are plain functions of picklable arguments, so they run in a process pool: each reads its
documents from disk, joins and encodes them, writes its shard atomically and returns its token count,
checksum and token histogram. No process ever holds more than one shard's text.

Legend: N documents, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import _join, is_val_file
from .documents import DOC_DTYPE, Source, read_texts
from .files import sha256_file, write_atomic
from .tokenizer import Tokenizer, iter_chunks, tokenizer_from_json, train_tokenizer_on

SPLITS = ("train", "val")
FORCE_FACTOR = 4  # a shard is cut at an unsafe seam only past this many times data.shard_bytes


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    lo: int  # documents [lo, hi) of the plan
    hi: int

    @property
    def file(self) -> str:
        return f"{self.split}-{self.index:05d}.bin"


@dataclass
class Plan:
    docs: np.ndarray  # DOC_DTYPE + split: train documents, then validation documents
    shards: list[ShardSpec]
    n_binary: int
    n_duplicates: int
    forced_seams: int
    content_sha256: str


def _keep_max_bytes(docs: np.ndarray, max_bytes: int) -> np.ndarray:
    if max_bytes <= 0:
        return docs
    return docs[np.cumsum(docs["nbytes"]) - docs["nbytes"] < max_bytes]


def _is_val(docs: np.ndarray, sources: list[Source], val_fraction: float) -> np.ndarray:
    """Text files by a hash of their path (the single-file corpus: its second part); records by a hash of
    their text, so adding files or records never moves another document across the split."""
    out = np.zeros(len(docs), dtype=bool)
    for i, d in enumerate(docs):
        src = sources[int(d["file"])]
        if src.single:
            out[i] = d["rec"] == 1
        elif src.kind == "text":
            out[i] = is_val_file(src.file.rel, val_fraction)
        else:
            out[i] = int.from_bytes(bytes(d["digest"])[:8], "big") % 10000 < val_fraction * 10000
    if len(docs) >= 2 and not out.any():
        out[np.flatnonzero(~out)[-1]] = True  # the last document
    elif len(docs) >= 2 and out.all():
        out[0] = False
    return out


def _cut(docs: np.ndarray, shard_bytes: int) -> tuple[list[tuple[int, int]], int]:
    """Document ranges of the shards of one split, cut at safe seams; and how many seams were forced."""
    n = len(docs)
    if n == 0:
        return [(0, 0)], 0
    safe_after = np.zeros(n, dtype=bool)  # a seam after document i is safe
    safe_after[:-1] = docs["clean_end"][:-1] & docs["clean_start"][1:]
    ends = np.cumsum(docs["nbytes"])
    ranges, lo, forced = [], 0, 0
    while lo < n:
        base = ends[lo - 1] if lo else 0
        want = int(np.searchsorted(ends, base + shard_bytes, side="left"))  # the doc that reaches the size
        limit = int(np.searchsorted(ends, base + FORCE_FACTOR * shard_bytes, side="left"))
        if want >= n - 1:
            ranges.append((lo, n))
            break
        candidates = np.flatnonzero(safe_after[want : min(limit, n - 1) + 1])
        if candidates.size:
            hi = want + int(candidates[0]) + 1
        else:
            hi, forced = min(limit, n - 1) + 1, forced + 1
        ranges.append((lo, hi))
        lo = hi
    return ranges, forced


def content_hash(docs: np.ndarray, sources: list[Source], split: np.ndarray) -> str:
    """sha256 over (split, document key, text digest) of the kept documents in order: equal on two machines
    exactly when they would train and validate on the same text."""
    h = hashlib.sha256()
    for d, is_val in zip(docs, split):
        rel = sources[int(d["file"])].file.rel
        key = f"{'val' if is_val else 'train'}\0{rel}\0{int(d['rec'])}\0"
        h.update(key.encode("utf-8", "surrogateescape"))
        h.update(bytes(d["digest"]))
    return h.hexdigest()


def make_plan(
    sources: list[Source], tables: list[np.ndarray], val_fraction: float, dedup: bool, max_bytes: int,
    shard_bytes: int,
) -> Plan:  # fmt: skip
    """Binary documents out, (records) ``max_bytes``, exact duplicates out (first in corpus order kept),
    the split, and the shards."""
    docs = np.concatenate(tables) if tables else np.zeros(0, dtype=DOC_DTYPE)
    binary = docs["binary"]
    docs = docs[~binary & (docs["nbytes"] > 0)]
    if any(s.kind != "text" for s in sources):
        docs = _keep_max_bytes(docs, max_bytes)
    n_dup = 0
    if dedup and len(docs):
        _, first = np.unique(docs["digest"], return_index=True)
        n_dup = len(docs) - len(first)
        docs = docs[np.sort(first)]
    is_val = _is_val(docs, sources, val_fraction)
    ordered = np.concatenate([docs[~is_val], docs[is_val]])
    split = np.concatenate([np.zeros((~is_val).sum(), bool), np.ones(is_val.sum(), bool)])
    shards, forced, offset = [], 0, 0
    for name, part in (("train", ordered[~split]), ("val", ordered[split])):
        ranges, f = _cut(part, shard_bytes)
        forced += f
        shards += [ShardSpec(name, i, offset + lo, offset + hi) for i, (lo, hi) in enumerate(ranges)]
        offset += len(part)
    return Plan(ordered, shards, int(binary.sum()), n_dup, forced, content_hash(ordered, sources, split))


# ----------------------------------------------------------------------------------------------------
# workers (run in a process pool: plain functions of picklable arguments)


def shard_text(sources: list[Source], docs: np.ndarray) -> str:
    """The joined text of consecutive plan documents (each ending with a newline)."""
    texts: list[str] = []
    i = 0
    while i < len(docs):
        j = i
        while j < len(docs) and docs[j]["file"] == docs[i]["file"]:
            j += 1
        texts.extend(read_texts(sources[int(docs[i]["file"])], docs[i:j]))
        i = j
    return _join(texts)


def encode_shard(
    sources: list[Source], docs: np.ndarray, tokenizer_json: str, path: str, dtype: str, vocab: int
) -> dict:
    """Tokenize one shard's documents into ``path`` (atomically); its count, checksum and histogram."""
    tok = tokenizer_from_json(json.loads(tokenizer_json), "<cache>")
    text = shard_text(sources, docs)
    ids = tok.encode(text, dtype=np.dtype(dtype))
    out = Path(path)
    write_atomic(out, lambda fh: fh.write(np.ascontiguousarray(ids).data))
    return {
        "tokens": int(ids.size),
        "size": out.stat().st_size,
        "sha256": sha256_file(out),
        "text_bytes": len(text.encode("utf-8", "surrogatepass")),
        "counts": np.bincount(ids, minlength=vocab).astype(np.int64),
    }


def train_chunks(sources: list[Source], docs: np.ndarray, shards: list[ShardSpec]) -> Iterator[str]:
    """The training split's text shard by shard, in chunks cut at safe points (bounded memory)."""
    for spec in shards:
        if spec.split == "train":
            yield from iter_chunks(shard_text(sources, docs[spec.lo : spec.hi]))


def train_tokenizer_job(
    sources: list[Source], docs: np.ndarray, shards: list[ShardSpec], kind: str, vocab: int
) -> str:
    """Train the tokenizer on the streamed training split; its JSON (a pool job: the memory it takes is
    freed with the worker)."""
    tok: Tokenizer = train_tokenizer_on(kind, train_chunks(sources, docs, shards), vocab)
    return tok.to_json()
