"""Documents of a corpus: what the shard builder scans, deduplicates, splits and tokenizes.

A document is a whole text file, one record of a JSONL or Parquet file (its ``data.text_field``), or one
of the two parts of a single-file corpus (cut at ``1 - val_fraction`` of its bytes). Scanning a source
file gives, per document, its place (record, byte range), the UTF-8 size and a 16-byte digest of its
text (the dedup key; the split key of records), whether it is binary, and whether it starts and ends
with a non-space character: only between two such documents can the joined text be cut without
changing its tokens (see ``tokenizer.iter_chunks``).

Legend: N documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .corpus import CorpusFile, _cut_point, decode_counting, read_file_bytes

RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DOC_DTYPE = np.dtype(
    [
        ("file", np.int32),  # index into the listing's files
        ("rec", np.int64),  # record index (JSONL line among non-empty lines, Parquet row); -1: whole file
        ("start", np.int64),  # byte range in the file (JSONL line, single-file part); 0, 0 otherwise
        ("end", np.int64),
        ("nbytes", np.int64),  # UTF-8 bytes of the text
        ("digest", "S16"),  # sha1 of the text, first 16 bytes
        ("binary", np.bool_),  # holds NUL bytes: skipped
        ("clean_start", np.bool_),
        ("clean_end", np.bool_),
        ("n_replaced", np.int64),  # undecodable bytes replaced by U+FFFD
    ]
)


def file_kind(rel: str) -> str:
    """``text``, ``jsonl`` or ``parquet``, by the file's suffix."""
    return RECORD_SUFFIXES.get(Path(rel).suffix.lower(), "text")


def _edges(text: str) -> tuple[bool, bool]:
    """(starts with a non-space, ends with a non-space before its closing newline) of a joined document."""
    body = text if text.endswith("\n") else text + "\n"
    return (bool(text) and not text[0].isspace(), len(body) >= 2 and not body[-2].isspace())


def _row(file: int, rec: int, start: int, end: int, text: str, binary: bool = False, bad: int = 0) -> tuple:
    data = text.encode("utf-8", "surrogatepass")
    lead, tail = _edges(text)
    return (file, rec, start, end, len(data), hashlib.sha1(data).digest()[:16], binary, lead, tail, bad)


@dataclass(frozen=True)
class Source:
    """A listed file and how to read documents out of it."""

    file: CorpusFile
    kind: str  # text | jsonl | parquet
    text_field: str = "text"
    single: bool = False  # the only file of a single-file text corpus: two parts (train, val)
    val_fraction: float = 0.05


# ----------------------------------------------------------------------------------------------------
# scanning


def scan(index: int, src: Source) -> np.ndarray:
    """The documents of one source file (DOC_DTYPE rows, in file order)."""
    if src.kind == "jsonl":
        rows = [_row(index, r, a, b, t) for r, a, b, t in _jsonl_records(src)]
    elif src.kind == "parquet":
        rows = [_row(index, r, 0, 0, t) for r, t in enumerate(_parquet_texts(src)) if t]
    else:
        rows = _scan_text(index, src)
    return np.array(rows, dtype=DOC_DTYPE)


def _scan_text(index: int, src: Source) -> list[tuple]:
    data = read_file_bytes(src.file)
    if b"\0" in data:
        return [(index, -1, 0, 0, len(data), b"", True, False, False, 0)]
    if not data:
        return []
    if not src.single:
        text, bad = decode_counting(data)
        return [_row(index, -1, 0, 0, text, bad=bad)]
    if len(data) < 2:
        raise ConfigError(
            f"data.corpus: '{src.file.rel}' holds {len(data)} byte(s), too little to split into train and "
            "validation text; use a larger corpus"
        )
    cut = _cut_point(data, round(len(data) * (1.0 - src.val_fraction)))
    parts = []
    for rec, (a, b) in enumerate(((0, cut), (cut, len(data)))):
        text, bad = decode_counting(data[a:b])
        parts.append(_row(index, rec, a, b, text, bad=bad))
    return parts


def _record_error(src: Source, where: str, why: str) -> ConfigError:
    return ConfigError(f"data.text_field = {src.text_field!r}: '{src.file.path}' {where}: {why}")


def _text_of(src: Source, obj: object, where: str) -> str:
    if not isinstance(obj, dict):
        raise _record_error(src, where, f"is a JSON {type(obj).__name__}, not an object")
    if src.text_field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:10]) or "none"
        raise _record_error(src, where, f"has no field {src.text_field!r} (its fields: {keys})")
    value = obj[src.text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _record_error(src, where, f"field {src.text_field!r} is a {type(value).__name__}, not a string")
    return value


def _jsonl_records(src: Source) -> Iterator[tuple[int, int, int, str]]:
    """(record index, start byte, end byte, text) of every non-empty line with a non-empty text."""
    rec, pos = 0, 0
    try:
        with open(src.file.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise _record_error(src, f"line {lineno}", f"is not JSON ({e})") from None
                text = _text_of(src, obj, f"line {lineno}")
                if text:
                    yield rec, start, pos, text
                rec += 1
    except OSError as e:
        raise ConfigError(f"data.corpus: cannot read '{src.file.path}' ({e.strerror})") from None


def _parquet_file(src: Source):
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - only Parquet corpora need pyarrow
    except ImportError:
        raise ConfigError(
            f"data.corpus: '{src.file.path}' is a Parquet file; reading it needs pyarrow "
            "(pip install pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(src.file.path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise ConfigError(f"data.corpus: cannot read '{src.file.path}' as Parquet ({e})") from None
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise _record_error(src, "", f"has no column {src.text_field!r} (its columns: {', '.join(names)})")
    return pf


def _parquet_texts(src: Source, groups: Sequence[int] | None = None) -> Iterator[str]:
    """The text column, row by row (of the listed row groups only; None: all)."""
    pf = _parquet_file(src)
    for g in range(pf.num_row_groups) if groups is None else groups:
        column = pf.read_row_group(g, columns=[src.text_field]).column(0)
        for value in column.to_pylist():
            if value is not None and not isinstance(value, str):
                where = f"row group {g}"
                kind = type(value).__name__
                raise _record_error(src, where, f"column {src.text_field!r} holds {kind}, not strings")
            yield value or ""


# ----------------------------------------------------------------------------------------------------
# reading documents back (the shard builder)


def read_texts(src: Source, docs: np.ndarray) -> Iterator[str]:
    """The texts of ``docs`` (rows of one source file, in file order)."""
    if src.kind == "jsonl":
        with open(src.file.path, "rb") as fh:
            for d in docs:
                fh.seek(int(d["start"]))
                yield _text_of(src, json.loads(fh.read(int(d["end"] - d["start"]))), f"byte {d['start']}")
    elif src.kind == "parquet":
        yield from _parquet_rows(src, docs["rec"])
    elif src.single:
        data = read_file_bytes(src.file)
        for d in docs:
            yield decode_counting(data[int(d["start"]) : int(d["end"])])[0]
    else:
        for _ in docs:
            yield decode_counting(read_file_bytes(src.file))[0]


def _parquet_rows(src: Source, rows: np.ndarray) -> Iterator[str]:
    pf = _parquet_file(src)
    sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.unique(np.searchsorted(first, rows, side="right") - 1)
    texts = {}
    for g in groups:  # only the row groups that hold wanted rows
        for i, text in enumerate(_parquet_texts(src, [int(g)])):
            texts[int(first[g]) + i] = text
    for r in rows:
        yield texts[int(r)]
