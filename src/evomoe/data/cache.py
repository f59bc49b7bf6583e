"""The token cache: ``<cache_dir>/<fingerprint[:16]>/`` holds a split's tokens as shards and a manifest.

Files: ``train-00000.bin ...`` and ``val-00000.bin ...`` (flat token ids: uint16, or uint32 for
vocabularies over 65535), ``tokenizer.json``, ``plan.npz`` (which documents make up each shard),
``counts.npy`` (the training split's token histogram, for routers that need frequencies) and
``manifest.json``. Every file is written atomically (temp file, fsync, rename) and the manifest last, so
a crash mid-build leaves no manifest and the next load rebuilds. A load checks every file's size and
sha256 against the manifest: a damaged shard is tokenized again from the cache's own plan and tokenizer
(with a message naming it), anything else damaged rebuilds the cache; nothing damaged is ever used.

The manifest also identifies the text: corpus kind, the packages and versions of a package corpus, the
file count and a content hash over the kept documents (``shards.content_hash``), which a run directory
keeps (``data.json``) so that resuming on other text is an error, not a silent change.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, DataConfig
from .build import Built, build_shards, rebuild_shards
from .corpus import FORMAT_VERSION, CorpusListing, effective_dedup, list_corpus
from .files import fsync_dir, sha256_file, write_atomic
from .shards import SPLITS, Plan, ShardSpec
from .tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from .tokens import ShardedTokens

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.npz"
COUNTS_FILE = "counts.npy"
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
    """A loaded (or freshly built) cache: the splits over their memory-mapped shards, the tokenizer, the
    manifest and the training split's token histogram."""

    directory: Path
    train: ShardedTokens
    val: ShardedTokens
    tokenizer: Tokenizer
    meta: dict[str, Any]
    rebuilt: bool
    counts: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------
# files


def open_tokens(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    """A read-only memmap of ``n`` ids (an empty array when ``n`` is 0: mmap cannot map 0 bytes)."""
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# ----------------------------------------------------------------------------------------------------
# the plan on disk


def save_plan(path: Path, plan: Plan) -> None:
    specs = np.array([(SPLITS.index(s.split), s.index, s.lo, s.hi) for s in plan.shards], dtype=np.int64)
    write_atomic(path, lambda fh: np.savez(fh, docs=plan.docs, shards=specs.reshape(-1, 4)))


def load_plan(path: Path, meta: dict[str, Any]) -> Plan:
    with np.load(path) as z:
        docs, specs = z["docs"], z["shards"]
    shards = [ShardSpec(SPLITS[int(a)], int(b), int(c), int(d)) for a, b, c, d in specs]
    return Plan(docs, shards, meta["n_binary_skipped"], meta["n_duplicates"], meta["forced_seams"],
                meta["content_sha256"])  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# checking and loading


def check_cache(directory: Path, fingerprint: str) -> tuple[dict[str, Any] | None, str, list[str]]:
    """(manifest, "", damaged shard files) when the cache is usable (shards may need rebuilding), else
    (None, why not, [])."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None, f"no {MANIFEST_FILE}", []
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            return None, f"cache format {meta.get('format')} != {FORMAT_VERSION}", []
        if meta.get("fingerprint") != fingerprint:
            return None, "the corpus or data config changed (fingerprint differs)", []
        for name, want in meta["files"].items():
            why = _damage(directory / name, want)
            if why:
                return None, f"{name} {why}", []
        dtype = np.dtype(meta["dtype"])
        bad = []
        for shard in meta["shards"]:
            why = _damage(directory / shard["file"], shard)
            if not why and shard["size"] != shard["tokens"] * dtype.itemsize:
                why = "has a size that does not match its token count"
            if why:
                bad.append(f"{shard['file']} {why}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})", []
    return meta, "", bad


def _damage(path: Path, want: dict[str, Any]) -> str:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != want["size"]:
        return f"has {size} bytes, the manifest says {want['size']} (truncated?)"
    if sha256_file(path) != want["sha256"]:
        return "is corrupt (sha256 differs from the manifest)"
    return ""


def load_cached(directory: Path, meta: dict[str, Any], rebuilt: bool = False) -> CachedTokens:
    """Open a cache that :func:`check_cache` accepted (ValueError when the tokenizer does not load)."""
    dtype = np.dtype(meta["dtype"])
    tok = load_tokenizer(directory)
    if tok.vocab_size != meta["vocab_size"] or tok.kind != meta["tokenizer"]:
        raise ValueError("the tokenizer does not match the manifest")
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for shard in meta["shards"]:
        parts[shard["split"]].append(open_tokens(directory / shard["file"], dtype, int(shard["tokens"])))
    counts = np.load(directory / COUNTS_FILE)
    train, val = (ShardedTokens(parts[s]) for s in SPLITS)
    return CachedTokens(directory, train, val, tok, meta, rebuilt, counts)


# ----------------------------------------------------------------------------------------------------
# building


def _pick(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("tokens", "size", "sha256")}


def _replaced(listing: CorpusListing, plan: Plan) -> list[str]:
    """The files whose undecodable bytes were replaced (their documents are kept)."""
    return sorted({listing.files[int(f)].rel for f in plan.docs["file"][plan.docs["n_replaced"] > 0]})


def _manifest(cfg: DataConfig, listing: CorpusListing, built: Built) -> dict[str, Any]:
    plan, specs = built.plan, built.plan.shards
    shards = [
        {"split": s.split, "file": s.file, "docs": [s.lo, s.hi], **_pick(r)}
        for s, r in zip(specs, built.shards)
    ]
    per_split = {k: {s: 0 for s in SPLITS} for k in ("tokens", "text_bytes", "n_files")}
    for s, r in zip(specs, built.shards):
        per_split["tokens"][s.split] += r["tokens"]
        per_split["text_bytes"][s.split] += r["text_bytes"]
        per_split["n_files"][s.split] += s.hi - s.lo
    return {
        "format": FORMAT_VERSION,
        "fingerprint": listing.fingerprint,
        "corpus": cfg.corpus,
        "corpus_kind": listing.kind,
        "corpus_root": str(listing.root),
        "packages": [{"name": n, "version": v, "files": k} for n, v, k in listing.packages],
        "source_files": len(listing.files),
        "content_sha256": plan.content_sha256,
        "dedup": effective_dedup(cfg, listing.kind),
        "n_duplicates": plan.n_duplicates,
        "n_binary_skipped": plan.n_binary,
        "n_replaced": int(plan.docs["n_replaced"].sum()),
        "replaced_files": _replaced(listing, plan),
        "forced_seams": plan.forced_seams,
        "dtype": token_dtype(built.tokenizer.vocab_size).name,
        "tokenizer": built.tokenizer.kind,
        "vocab_size": built.tokenizer.vocab_size,
        **per_split,
        "shards": shards,
        "build": {"workers": built.workers, "seconds": {k: round(v, 2) for k, v in built.seconds.items()}},
    }


def build_cache(
    cfg: DataConfig, directory: Path, listing: CorpusListing, log: Log = log_stderr,
    tokenizer: Tokenizer | None = None,
) -> CachedTokens:  # fmt: skip
    """Scan, plan, train the tokenizer, tokenize every shard, and write the manifest last."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)  # the cache is invalid until the new one lands
        for old in directory.glob("*.bin"):
            old.unlink()
        built = build_shards(cfg, listing, directory, token_dtype, log, tokenizer)
        saved = built.tokenizer.to_json().encode("utf-8")
        write_atomic(directory / TOKENIZER_FILE, lambda fh: fh.write(saved))
        save_plan(directory / PLAN_FILE, built.plan)
        counts = sum(r["counts"] for s, r in zip(built.plan.shards, built.shards) if s.split == "train")
        write_atomic(directory / COUNTS_FILE, lambda fh: np.save(fh, np.asarray(counts, dtype=np.int64)))
        meta = _manifest(cfg, listing, built)
        meta["files"] = {n: _file_record(directory / n) for n in (TOKENIZER_FILE, PLAN_FILE, COUNTS_FILE)}
        payload = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8")
        write_atomic(directory / MANIFEST_FILE, lambda fh: fh.write(payload))
        fsync_dir(directory)
    except OSError as e:
        raise ConfigError(
            f"data.cache_dir: cannot write the token cache in '{directory}' ({e.strerror or e}); "
            "set data.cache_dir or $EVOMOE_CACHE to a writable directory"
        ) from None
    describe(meta, directory, log)
    return load_cached(directory, meta, rebuilt=True)


def describe(meta: dict[str, Any], directory: Path, log: Log) -> None:
    t, n = meta["tokens"], meta["n_files"]
    secs = sum(meta["build"]["seconds"].values())
    log(
        f"data: wrote token cache {directory} in {secs:.0f} s: {t['train']:,} train / {t['val']:,} val "
        "tokens "
        f"in {len(meta['shards'])} shard(s), {n['train']:,} / {n['val']:,} documents, "
        f"{meta['n_duplicates']:,} duplicates removed, {meta['n_binary_skipped']} binary skipped, "
        f"{meta['n_replaced']} undecodable bytes replaced ({meta['tokenizer']} vocab {meta['vocab_size']}, "
        f"{meta['build']['workers']} worker(s))"
    )
    bad = meta["replaced_files"]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        log(
            f"warning: data: {len(bad)} file(s) are not UTF-8 ({shown}): their {meta['n_replaced']} "
            "undecodable bytes were replaced by U+FFFD; re-encode them as UTF-8 or leave them out "
            "(data.extensions)"
        )


def repair(cfg: DataConfig, directory: Path, listing: CorpusListing, meta: dict, bad: list[str], log: Log):
    """Tokenize the damaged shards again from the cache's own plan and tokenizer; then load."""
    names = {b.split(" ", 1)[0] for b in bad}
    plan = load_plan(directory / PLAN_FILE, meta)
    specs = [s for s in plan.shards if s.file in names]
    tok = load_tokenizer(directory)
    records = rebuild_shards(cfg, listing, plan, specs, tok, directory, token_dtype, log)
    by_file = {s.file: r for s, r in zip(specs, records)}
    for shard in meta["shards"]:
        r = by_file.get(shard["file"])
        if r is not None and (r["tokens"], r["sha256"]) != (shard["tokens"], shard["sha256"]):
            raise ConfigError(
                f"data.corpus = {cfg.corpus!r}: rebuilding {shard['file']} in '{directory}' gave other "
                "tokens than the manifest records (the corpus files changed without changing size or time?); "
                "delete that directory to rebuild the whole cache"
            )
    log(f"data: rebuilt {len(specs)} shard(s) in {directory}")
    return load_cached(directory, meta, rebuilt=True)


def load_or_build(
    cfg: DataConfig, env: Mapping[str, str], log: Log = log_stderr, tokenizer: Tokenizer | None = None
) -> CachedTokens:
    """The cache for ``cfg``: reused when intact, damaged shards rebuilt, else (re)built, with a log line
    that says why."""
    listing = list_corpus(cfg)
    directory = resolve_cache_dir(cfg, env) / listing.fingerprint[:16]
    meta, why, bad = check_cache(directory, listing.fingerprint)
    if meta is not None:
        try:
            if bad:
                for b in bad:
                    log(f"warning: data: shard {b}: tokenizing it again")
                return repair(cfg, directory, listing, meta, bad, log)
            cached = load_cached(directory, meta)
        except (OSError, ValueError, KeyError) as e:
            why = f"cannot open it ({e})"
        else:
            log(f"data: using token cache {directory}")
            return cached
    if why == f"no {MANIFEST_FILE}" and not directory.exists():
        log(f"data: building token cache {directory}")
    else:
        log(f"warning: data: rebuilding token cache {directory}: {why}")
    return build_cache(cfg, directory, listing, log, tokenizer)
