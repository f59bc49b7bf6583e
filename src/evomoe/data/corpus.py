"""Find, fingerprint, read and split the text corpus.

A corpus is the Python standard library of the running interpreter (``data.corpus = "stdlib"``), the
Python sources of a pinned set of installed packages (``"pypackages"``, see ``packages.py``), one file, or
a directory of files: text, or JSONL / Parquet records with a text field (``documents.py``). Files are
listed in sorted order of their relative path,
``data.max_bytes`` keeps a prefix of that list, and the train/validation split is made per file by a
stable hash of the relative path, so adding a file never moves another file across the split.

Listing and fingerprinting only ``stat`` the files; the text is read only when a token cache is built.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, DataConfig
from .packages import CORPORA, find_packages

FORMAT_VERSION = 2  # bump when the way text or tokens are produced changes: every cache is rebuilt
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


@dataclass(frozen=True)
class CorpusFile:
    """One corpus file as listed (``limit``: read only this many leading bytes; None: all of it)."""

    path: Path
    rel: str  # relative path with '/' separators: the key of the split hash and the sort order
    size: int
    mtime_ns: int
    limit: int | None = None


@dataclass(frozen=True)
class CorpusListing:
    """The files a config selects, and the fingerprint that keys the token cache."""

    kind: str  # stdlib | packages | file | dir
    root: Path
    files: tuple[CorpusFile, ...]
    fingerprint: str
    packages: tuple[tuple[str, str, int], ...] = ()  # (name, version, .py files) of a package corpus


@dataclass(frozen=True)
class CorpusText:
    """The decoded train and validation text of a corpus."""

    train_text: str
    val_text: str
    n_files_train: int
    n_files_val: int
    n_replaced: int  # undecodable bytes replaced by U+FFFD
    n_binary_skipped: int  # files that contain NUL bytes
    fingerprint: str
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    replaced_files: tuple[str, ...] = ()  # files that held undecodable bytes


# ----------------------------------------------------------------------------------------------------
# listing


def parse_extensions(spec: str) -> tuple[str, ...]:
    """``".py, txt"`` -> ``(".py", ".txt")``; empty is an error naming ``data.extensions``."""
    parts = (part.strip().lower() for part in spec.split(","))
    exts = tuple(sorted({p if p.startswith(".") else "." + p for p in parts if p}))
    if not exts:
        raise ConfigError(f"data.extensions = {spec!r}: name at least one file suffix, e.g. '.py,.txt'")
    return exts


def _stat_file(path: Path, rel: str) -> CorpusFile:
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(
            f"data.corpus: cannot read '{path}' ({e.strerror}); fix its permissions or "
            "remove it from the corpus"
        ) from None
    return CorpusFile(path=path, rel=rel, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _walk(root: Path, keep_file: Callable[[str], bool], skip_dir: Callable[[str], bool]) -> list[CorpusFile]:
    """All files under ``root`` that ``keep_file(name)`` accepts, sorted by relative path."""
    out: list[CorpusFile] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        for name in filenames:
            if keep_file(name):
                full = Path(dirpath) / name
                out.append(_stat_file(full, full.relative_to(root).as_posix()))
    if errors:
        e = errors[0]
        raise ConfigError(f"data.corpus: cannot list '{e.filename}' ({e.strerror}); fix its permissions")
    out.sort(key=lambda f: f.rel)
    return out


def stdlib_root() -> Path:
    """The source directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool) -> list[CorpusFile]:
    """Every ``*.py`` file of the standard library, without site-packages and (by default) tests."""
    root = stdlib_root()
    if not root.is_dir():
        raise ConfigError(
            f"data.corpus = 'stdlib': the standard library directory '{root}' does not exist; "
            "set data.corpus to a text file or directory instead"
        )
    skip = STDLIB_SKIP if include_tests else STDLIB_SKIP | STDLIB_TEST_DIRS
    return _walk(root, lambda n: n.endswith(".py"), lambda d: d in skip)


def select_max_bytes(files: Iterable[CorpusFile], max_bytes: int) -> list[CorpusFile]:
    """Keep files in order until ``max_bytes``; the file that crosses the budget is cut (``limit``)."""
    files = list(files)
    if max_bytes <= 0:
        return files
    out: list[CorpusFile] = []
    total = 0
    for f in files:
        if total >= max_bytes:
            break
        room = max_bytes - total
        out.append(f if f.size <= room else CorpusFile(f.path, f.rel, f.size, f.mtime_ns, limit=room))
        total += min(f.size, room)
    return out


def list_corpus(cfg: DataConfig) -> CorpusListing:
    """Resolve ``data.corpus`` to its files (stat only) and fingerprint them with the relevant config."""
    packages: tuple[tuple[str, str, int], ...] = ()
    if cfg.corpus == "stdlib":
        kind, root = "stdlib", stdlib_root()
        files = stdlib_files(cfg.include_tests)
    elif cfg.corpus in CORPORA:
        kind, found = "packages", find_packages(cfg.corpus)
        root = Path(found[0].files[0].path).parents[len(Path(found[0].files[0].rel).parts) - 1]
        files = sorted(
            (_stat_file(f.path, f.rel) for p in found for f in p.files), key=lambda f: f.rel
        )
        packages = tuple((p.name, p.version, len(p.files)) for p in found)
    else:
        root = Path(cfg.corpus).expanduser()
        if not root.exists():
            raise ConfigError(
                f"data.corpus = {cfg.corpus!r}: the path '{root}' does not exist; set data.corpus "
                f"to 'stdlib' or to an existing text file or directory{_doc_hint(root)}"
            )
        root = root.resolve()
        if root.is_file():
            kind, files = "file", [_stat_file(root, root.name)]
            root = root.parent
        elif root.is_dir():
            kind = "dir"
            exts = parse_extensions(cfg.extensions)
            files = _walk(
                root, lambda n: n.lower().endswith(exts), lambda d: d.startswith(".") or d == "__pycache__"
            )
        else:
            raise ConfigError(f"data.corpus = {cfg.corpus!r}: '{root}' is neither a file nor a directory")
    files = [f for f in files if f.size > 0]
    if not files:
        what = f"no non-empty files with suffixes {cfg.extensions!r}" if kind == "dir" else "no text"
        raise ConfigError(
            f"data.corpus = {cfg.corpus!r}: the corpus is empty ({what} under '{root}'); "
            "point data.corpus at a directory with text files, or change data.extensions"
        )
    files = select_max_bytes(files, cfg.max_bytes)
    fp = fingerprint(kind, root, files, cfg, packages)
    return CorpusListing(kind=kind, root=root, files=tuple(files), fingerprint=fp, packages=packages)


def effective_dedup(cfg: DataConfig, kind: str) -> bool:
    """``data.dedup``; a package corpus is always deduplicated (vendored copies are part of what it is)."""
    return cfg.dedup or kind == "packages"


def _doc_hint(root: Path) -> str:
    """How to fetch the Python documentation corpus (the ``pydocs`` preset) when it is missing."""
    m = re.search(r"/usr/share/doc/(python3\.\d+)/", root.as_posix() + "/")
    if not m:
        return ""
    return f" (the Python documentation sources: apt-get update && apt-get install -y {m.group(1)}-doc)"


def fingerprint(
    kind: str, root: Path, files: Iterable[CorpusFile], cfg: DataConfig, packages: tuple = ()
) -> str:
    """sha256 over the file list (paths, sizes, mtimes, cut points) and every config field that matters."""
    h = hashlib.sha256()
    vocab = cfg.vocab_size if cfg.tokenizer == "bpe" else 256
    head = (
        f"evomoe-data v{FORMAT_VERSION}|{kind}|{root}|tests={cfg.include_tests}|max={cfg.max_bytes}|"
        f"val={cfg.val_fraction!r}|ext={cfg.extensions if kind == 'dir' else ''}|"
        f"tok={cfg.tokenizer}|vocab={vocab}|dedup={effective_dedup(cfg, kind)}|field={cfg.text_field}|"
        f"shard={cfg.shard_bytes}|packages={packages}\n"
    )
    h.update(head.encode())
    for f in files:
        h.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\0{f.limit}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# reading and splitting


def decode_counting(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with U+FFFD replacement; also return how many bytes could not be decoded."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        n_bad = len(_SURROGATE.findall(data.decode("utf-8", "surrogateescape")))
        return data.decode("utf-8", "replace"), n_bad


def _cut_point(data: bytes, at: int) -> int:
    """A byte offset near ``at`` on a line boundary (after a newline), else on a UTF-8 char boundary."""
    at = max(1, min(at, len(data) - 1))
    nl = data.rfind(b"\n", 0, at)
    if nl < 0:
        nl = data.find(b"\n", at, len(data) - 1)
    if nl >= 0:
        return nl + 1
    while 0 < at < len(data) and (data[at] & 0xC0) == 0x80:  # inside a multi-byte character
        at -= 1
    return at


def read_file_bytes(f: CorpusFile) -> bytes:
    """The bytes of one corpus file (its first ``limit`` bytes, cut back to a line end, when limited)."""
    try:
        with open(f.path, "rb") as fh:
            data = fh.read() if f.limit is None else fh.read(f.limit)
    except OSError as e:
        raise ConfigError(
            f"data.corpus: cannot read '{f.path}' ({e.strerror}); fix its permissions or "
            "remove it from the corpus"
        ) from None
    if f.limit is not None and f.limit < f.size and len(data) > 1:
        data = data[: _cut_point(data, len(data))]
    return data


def is_val_file(rel: str, val_fraction: float) -> bool:
    """The stable per-file split: sha1 of the relative path, mod 10000, against the held-out share."""
    h = int.from_bytes(hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h % 10000 < val_fraction * 10000


def split_names(rels: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split sorted relative paths into (train, val); both non-empty whenever there are >= 2 paths."""
    train = [r for r in rels if not is_val_file(r, val_fraction)]
    val = [r for r in rels if is_val_file(r, val_fraction)]
    if len(rels) >= 2 and not val:
        val.append(train.pop())  # the last file
    elif len(rels) >= 2 and not train:
        train.append(val.pop(0))  # the first file
    return train, val


def _join(parts: list[str]) -> str:
    """Concatenate file texts, each ending with a newline."""
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts)


def read_corpus(cfg: DataConfig, listing: CorpusListing | None = None) -> CorpusText:
    """Read the listed files, skip binary ones, decode, and split into train and validation text."""
    listing = listing if listing is not None else list_corpus(cfg)
    texts: dict[str, bytes] = {}
    n_binary = 0
    for f in listing.files:
        data = read_file_bytes(f)
        if b"\0" in data:
            n_binary += 1
            continue
        if data:
            texts[f.rel] = data
    if not texts:
        raise ConfigError(
            f"data.corpus = {cfg.corpus!r}: the corpus has no text ({n_binary} binary files "
            f"skipped under '{listing.root}'); point data.corpus at text files"
        )
    n_replaced = 0
    if len(texts) == 1:
        ((rel, data),) = texts.items()
        if len(data) < 2:
            raise ConfigError(
                f"data.corpus = {cfg.corpus!r}: '{rel}' holds {len(data)} byte(s), too little "
                "to split into train and validation text; use a larger corpus"
            )
        cut = _cut_point(data, round(len(data) * (1.0 - cfg.val_fraction)))
        train_text, n1 = decode_counting(data[:cut])
        val_text, n2 = decode_counting(data[cut:])
        bad = (rel,) if n1 + n2 else ()
        return CorpusText(
            train_text, val_text, 1, 1, n1 + n2, n_binary, listing.fingerprint, (rel,), (rel,), bad
        )
    train_rels, val_rels = split_names(sorted(texts), cfg.val_fraction)
    decoded: dict[str, str] = {}
    replaced_files = []
    for rel, data in texts.items():
        decoded[rel], n = decode_counting(data)
        n_replaced += n
        if n:
            replaced_files.append(rel)
    return CorpusText(
        train_text=_join([decoded[r] for r in train_rels]),
        val_text=_join([decoded[r] for r in val_rels]),
        n_files_train=len(train_rels),
        n_files_val=len(val_rels),
        n_replaced=n_replaced,
        n_binary_skipped=n_binary,
        fingerprint=listing.fingerprint,
        train_files=tuple(train_rels),
        val_files=tuple(val_rels),
        replaced_files=tuple(sorted(replaced_files)),
    )


def describe(text: CorpusText) -> str:
    """Log lines about a read corpus (a warning naming the files that are not UTF-8)."""
    line = (
        f"data: corpus {text.n_files_train} train / {text.n_files_val} val files, "
        f"{len(text.train_text):,} / {len(text.val_text):,} chars, {text.n_replaced} undecodable bytes "
        f"replaced, {text.n_binary_skipped} binary files skipped"
    )
    if text.replaced_files:
        shown = ", ".join(text.replaced_files[:5]) + (" ..." if len(text.replaced_files) > 5 else "")
        line += (
            f"\nwarning: data: {len(text.replaced_files)} file(s) are not UTF-8 ({shown}): their undecodable "
            "bytes were replaced by U+FFFD; re-encode them as UTF-8 or leave them out (data.extensions)"
        )
    return line
