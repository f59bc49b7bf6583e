"""The token cache: ``<cache_dir>/<fingerprint[:16]>/{train.bin, val.bin, tokenizer.json, meta.json}``.

``*.bin`` are flat arrays of token ids (uint16, or uint32 for vocabularies over 65535). Every file is
written atomically (a temp file in the same directory, fsync, ``os.replace``) and ``meta.json`` last,
so a crash mid-build leaves no meta and the next load rebuilds. A load checks the fingerprint, the file
sizes and the sha256 of every file against ``meta.json``, and rebuilds on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, DataConfig
from .corpus import FORMAT_VERSION, CorpusListing, describe, list_corpus, read_corpus
from .tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer

META_FILE = "meta.json"
SPLITS = ("train", "val")
Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    """The default ``log``: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def resolve_cache_dir(cfg: DataConfig, env: Mapping[str, str]) -> Path:
    """``data.cache_dir``, else ``$EVOMOE_CACHE``, else ``~/.cache/evomoe`` (``~`` from ``env['HOME']``)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if env.get("EVOMOE_CACHE"):
        return Path(env["EVOMOE_CACHE"]).expanduser()
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".cache" / "evomoe"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass(frozen=True)
class CachedTokens:
    """A loaded (or freshly built) cache: memory-mapped splits, the tokenizer and the meta record."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict[str, Any]
    rebuilt: bool


# ----------------------------------------------------------------------------------------------------
# files


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary file)`` on a temp file next to ``path``, fsync it, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def open_tokens(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    """A read-only memmap of ``n`` ids (an empty array when ``n`` is 0: mmap cannot map 0 bytes)."""
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


# ----------------------------------------------------------------------------------------------------
# checking and loading


def check_cache(directory: Path, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") when the cache in ``directory`` is complete and intact, else (None, why not)."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return None, "no meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            return None, "the corpus or data config changed (fingerprint differs)"
        if meta.get("format") != FORMAT_VERSION:
            return None, f"cache format {meta.get('format')} != {FORMAT_VERSION}"
        dtype = np.dtype(meta["dtype"])
        for name in (*SPLITS, "tokenizer"):
            fname = TOKENIZER_FILE if name == "tokenizer" else f"{name}.bin"
            path = directory / fname
            want = meta["files"][fname]
            if not path.is_file():
                return None, f"{fname} is missing"
            if path.stat().st_size != want["size"]:
                return None, f"{fname} has {path.stat().st_size} bytes, meta.json says {want['size']}"
            if name != "tokenizer" and want["size"] != meta["tokens"][name] * dtype.itemsize:
                return None, f"{fname}: size does not match its token count"
            if sha256_file(path) != want["sha256"]:
                return None, f"{fname} is corrupt (sha256 differs from meta.json)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"meta.json is unreadable ({type(e).__name__}: {e})"
    return meta, ""


def load_cached(directory: Path, meta: dict[str, Any]) -> CachedTokens:
    """Open a cache that :func:`check_cache` accepted (ValueError when the tokenizer does not load)."""
    dtype = np.dtype(meta["dtype"])
    tok = load_tokenizer(directory)
    if tok.vocab_size != meta["vocab_size"] or tok.kind != meta["tokenizer"]:
        raise ValueError("the tokenizer does not match meta.json")
    arrays = {s: open_tokens(directory / f"{s}.bin", dtype, int(meta["tokens"][s])) for s in SPLITS}
    return CachedTokens(directory, arrays["train"], arrays["val"], tok, meta, rebuilt=False)


# ----------------------------------------------------------------------------------------------------
# building


def build_cache(
    cfg: DataConfig,
    directory: Path,
    listing: CorpusListing,
    log: Log = log_stderr,
    tokenizer: Tokenizer | None = None,
) -> CachedTokens:
    """Read the corpus, train the tokenizer on the train split, encode both splits, write atomically."""
    text = read_corpus(cfg, listing)
    log(describe(text))
    tok = tokenizer or train_tokenizer(cfg.tokenizer, text.train_text, cfg.vocab_size)
    dtype = token_dtype(tok.vocab_size)
    ids = {"train": tok.encode(text.train_text, dtype=dtype), "val": tok.encode(text.val_text, dtype=dtype)}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)  # the cache is invalid until the new meta lands
        files: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            path = directory / f"{split}.bin"
            write_atomic(path, lambda fh, a=ids[split]: fh.write(np.ascontiguousarray(a).data))
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        saved = tok.to_json().encode("utf-8")
        write_atomic(directory / TOKENIZER_FILE, lambda fh: fh.write(saved))
        files[TOKENIZER_FILE] = {"size": len(saved), "sha256": hashlib.sha256(saved).hexdigest()}
        meta = {
            "format": FORMAT_VERSION,
            "fingerprint": listing.fingerprint,
            "corpus": cfg.corpus,
            "corpus_kind": listing.kind,
            "corpus_root": str(listing.root),
            "dtype": dtype.name,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "tokens": {s: int(ids[s].size) for s in SPLITS},
            "text_bytes": {
                "train": len(text.train_text.encode("utf-8")),
                "val": len(text.val_text.encode("utf-8")),
            },
            "n_files": {"train": text.n_files_train, "val": text.n_files_val},
            "n_replaced": text.n_replaced,
            "n_binary_skipped": text.n_binary_skipped,
            "files": files,
        }
        payload = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
        write_atomic(directory / META_FILE, lambda fh: fh.write(payload))
        _fsync_dir(directory)
    except OSError as e:
        raise ConfigError(
            f"data.cache_dir: cannot write the token cache in '{directory}' ({e.strerror or e}); "
            "set data.cache_dir or $EVOMOE_CACHE to a writable directory"
        ) from None
    del ids
    log(
        f"data: wrote token cache {directory} ({meta['tokens']['train']:,} train / "
        f"{meta['tokens']['val']:,} val tokens, {tok.kind} vocab {tok.vocab_size})"
    )
    arrays = {s: open_tokens(directory / f"{s}.bin", dtype, int(meta["tokens"][s])) for s in SPLITS}
    return CachedTokens(directory, arrays["train"], arrays["val"], tok, meta, rebuilt=True)


def load_or_build(
    cfg: DataConfig, env: Mapping[str, str], log: Log = log_stderr, tokenizer: Tokenizer | None = None
) -> CachedTokens:
    """The cache for ``cfg``: reused when intact, else (re)built with a log line that says why."""
    listing = list_corpus(cfg)
    directory = resolve_cache_dir(cfg, env) / listing.fingerprint[:16]
    meta, why = check_cache(directory, listing.fingerprint)
    if meta is not None:
        try:
            cached = load_cached(directory, meta)
        except (OSError, ValueError) as e:
            why = f"cannot open it ({e})"
        else:
            log(f"data: using token cache {directory}")
            return cached
    if why == "no meta.json" and not directory.exists():
        log(f"data: building token cache {directory}")
    else:
        log(f"warning: data: rebuilding token cache {directory}: {why}")
    return build_cache(cfg, directory, listing, log, tokenizer)
