"""Verse-aligned Bibles from SWORD modules (installed by the Debian packages ``sword-text-*``).

A source or target written ``sword:MODULE`` (e.g. ``sword:engWEB2015eb``, ``sword:spaRV1909eb``) is read
from the SWORD library (``$SWORD_PATH``, else ``/usr/share/sword``), and two modules are aligned by
their verse labels (``Gen.1.1``), so translations with different versification systems still pair the
same verse.

The zText format: ``{ot,nt}.bzs`` lists the zlib-compressed blocks (offset, size, uncompressed size:
3 x uint32), ``{ot,nt}.bzv`` every index slot (block, offset in the block: uint32, size: uint16), and
``{ot,nt}.bzz`` holds the blocks. Slots run module heading, testament heading, then per book a book
heading and per chapter a chapter heading followed by its verses. The OSIS markup marks each chapter
heading with ``<chapter sID="Gen.1">`` and each book heading with ``<div type="book" sID=...>``, which is
how verses get their labels here, without the versification tables.
"""

from __future__ import annotations

import html
import os
import re
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

from ..config import ConfigError
from .parallel import ParallelText, drop_empty

DEFAULT_SWORD_PATH = "/usr/share/sword"
_CHAPTER = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"')
_BOOK = re.compile(r'<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*>')
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE_PUNCT = re.compile(r"\s+([,.;:!?])")


def module_dir(name: str, env: Mapping[str, str] = os.environ) -> Path:
    """The data directory of an installed zText module (from its ``mods.d/*.conf``)."""
    root = Path(env.get("SWORD_PATH", DEFAULT_SWORD_PATH))
    for conf in sorted((root / "mods.d").glob("*.conf")) if (root / "mods.d").is_dir() else []:
        text = conf.read_text(encoding="utf-8", errors="replace")
        if not re.search(rf"^\[{re.escape(name)}\]\s*$", text, re.M):
            continue
        drv = re.search(r"^ModDrv=(\S+)", text, re.M)
        if drv is None or drv.group(1).lower() != "ztext":
            raise ConfigError(f"SWORD module {name!r} ({conf}) is not a zText module")
        path = re.search(r"^DataPath=(.+?)\s*$", text, re.M)
        return root / path.group(1).lstrip("./") if path else root
    raise ConfigError(
        f"SWORD module {name!r} is not installed under '{root}' (set $SWORD_PATH, or install it, e.g. "
        "`sudo apt-get install sword-text-web sword-text-sparv` for engWEB2015eb and spaRV1909eb)"
    )


def read_slots(directory: Path, testament: str) -> list[str]:
    """Every index slot's raw text (OSIS markup) of one testament (``ot`` or ``nt``); [] if absent."""
    bzs, bzv, bzz = (directory / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
    if not bzv.is_file():
        return []
    blocks_raw, index, data = bzs.read_bytes(), bzv.read_bytes(), bzz.read_bytes()
    blocks = []
    for off, size, _ in struct.iter_unpack("<III", blocks_raw):
        blocks.append(zlib.decompress(data[off : off + size]))
    slots = []
    for block, off, size in struct.iter_unpack("<IIH", index):
        slots.append(blocks[block][off : off + size].decode("utf-8", "replace") if size else "")
    return slots


def plain_text(osis: str) -> str:
    """Verse text without markup: footnotes dropped, tags removed, entities decoded, spaces collapsed."""
    text = html.unescape(_TAG.sub("", _NOTE.sub(" ", osis)))
    return _SPACE_PUNCT.sub(r"\1", " ".join(text.split()))


def label_verses(slots: list[str]) -> dict[str, str]:
    """``{"Gen.1.1": text, ...}``: slots after a chapter heading count as its verses 1, 2, ..."""
    out: dict[str, str] = {}
    chapter, verse = None, 0
    for slot in slots:
        m = _CHAPTER.search(slot)
        if m:
            chapter, verse = m.group(1), 0
            continue
        if _BOOK.search(slot):
            chapter = None
            continue
        if chapter is None:
            continue
        verse += 1
        out[f"{chapter}.{verse}"] = plain_text(slot)
    return out


def read_module(name: str, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    directory = module_dir(name, env)
    return label_verses(read_slots(directory, "ot") + read_slots(directory, "nt"))


def align_modules(source: str, target: str, env: Mapping[str, str] = os.environ) -> ParallelText:
    """Pairs of the verses both modules have, in the source's order (empty sides dropped and counted)."""
    src, tgt = read_module(source, env), read_module(target, env)
    keys = [k for k in src if k in tgt]
    if not keys:
        raise ConfigError(f"SWORD modules {source!r} and {target!r} share no verse labels")
    out = drop_empty(
        [src[k] for k in keys], [tgt[k] for k in keys], origin=f"sword:{source} / sword:{target}"
    )
    out.notes.append(
        f"{len(keys):,} verses in both modules ({len(src) - len(keys):,} only in {source}, "
        f"{len(tgt) - len(keys):,} only in {target})"
    )
    return out
