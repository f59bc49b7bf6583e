"""Parallel corpora for translation: two line-aligned text files (source, target), read and checked.

Line i of the source translates line i of the target. Files of different line counts are an error naming
both files and both counts. Pairs with an empty side are dropped and counted; so are pairs whose side is
longer than a limit (counted by the caller after tokenization, see ``drop_long``). The validation split
is by a stable hash of the source line, so adding pairs never moves another pair across the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError


@dataclass
class ParallelText:
    """Aligned (source, target) sentence pairs and what reading them dropped."""

    source: list[str]
    target: list[str]
    n_read: int = 0  # pairs in the files
    n_empty: int = 0  # pairs dropped: an empty (or all-space) side
    n_long: int = 0  # pairs dropped: a side over the length limit
    origin: str = ""  # where the pairs come from, for logs
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.source)

    def describe(self) -> str:
        """One log line; ``n_long`` is counted after tokenization, from the pairs still held here."""
        kept = len(self) - self.n_long
        return (
            f"data: {self.origin}: {self.n_read:,} pairs read, {kept:,} kept, {self.n_empty:,} dropped "
            f"for an empty side, {self.n_long:,} for a side over the length limit"
        )


def _read_lines(path: Path, field_: str) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{field_} = '{path}': cannot read it ({e.strerror})") from None
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    return [line.rstrip("\r") for line in lines]


def read_parallel(source: str | Path, target: str | Path, field_prefix: str = "task.mt") -> ParallelText:
    """Read two line-aligned files; ConfigError when their line counts differ (naming both)."""
    src_path, tgt_path = Path(source).expanduser(), Path(target).expanduser()
    src = _read_lines(src_path, f"{field_prefix}.source")
    tgt = _read_lines(tgt_path, f"{field_prefix}.target")
    if len(src) != len(tgt):
        raise ConfigError(
            f"{field_prefix}.source and {field_prefix}.target are not line-aligned: '{src_path}' has "
            f"{len(src):,} lines but '{tgt_path}' has {len(tgt):,}"
        )
    return drop_empty(src, tgt, origin=f"'{src_path}' / '{tgt_path}'")


def drop_empty(src: Sequence[str], tgt: Sequence[str], origin: str = "") -> ParallelText:
    """Strip both sides; drop (and count) the pairs with an empty side."""
    out = ParallelText([], [], n_read=len(src), origin=origin)
    for s, t in zip(src, tgt, strict=True):
        s, t = s.strip(), t.strip()
        if not s or not t:
            out.n_empty += 1
            continue
        out.source.append(s)
        out.target.append(t)
    return out


def is_val_pair(source_line: str, val_fraction: float) -> bool:
    """Stable split: sha1 of the source line, mod 10000, against the held-out share."""
    h = int.from_bytes(hashlib.sha1(source_line.encode("utf-8")).digest()[:8], "big")
    return h % 10000 < val_fraction * 10000


def split_pairs(text: ParallelText, val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the (train, val) pairs; both non-empty whenever there are >= 2 pairs."""
    val = [i for i, s in enumerate(text.source) if is_val_pair(s, val_fraction)]
    held = set(val)
    train = [i for i in range(len(text)) if i not in held]
    if len(text) >= 2 and not val:
        val.append(train.pop())
    elif len(text) >= 2 and not train:
        train.append(val.pop(0))
    return train, val
