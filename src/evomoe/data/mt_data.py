"""Translation data: read the pairs, split, train one tokenizer over both languages, encode, and cache.

``source`` is ``"synthetic"`` (the generated transduction), ``"sword:MODULE"`` (a Bible; the target too),
or a text file line-aligned with the ``target`` file. The tokenizer (with its special tokens) and the
encoded pairs are cached under ``<cache_dir>/mt-<fingerprint>/`` so that every run, resume and eval of
the same data uses the very same ids. Pairs with a side longer than ``max_tokens`` are dropped and
counted (``</s>`` / ``<s>`` included), never silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, DataConfig
from .cache import Log, log_stderr, resolve_cache_dir, sha256_file, write_atomic
from .parallel import ParallelText, read_parallel, split_pairs
from .sword import align_modules
from .synthetic import generate_pairs
from .tokenizer import SpecialTokens, load_tokenizer, train_tokenizer

MT_FORMAT_VERSION = 2  # 2: checksums of the cached files in meta.json


@dataclass
class MTData:
    """Encoded train / validation pairs (lists of int arrays), the reference texts, the tokenizer."""

    train_src: list[np.ndarray]
    train_tgt: list[np.ndarray]
    val_src: list[np.ndarray]
    val_tgt: list[np.ndarray]
    val_src_text: list[str]
    val_ref_text: list[str]
    tokenizer: SpecialTokens
    meta: dict


def read_pairs(
    source: str, target: str, synthetic: tuple[int, int, int, int], env: Mapping[str, str]
) -> ParallelText:
    """The pairs named by ``source`` / ``target``; ``synthetic`` = (pairs, words, max words, seed)."""
    if source == "synthetic":
        if target:
            raise ConfigError(f"task.mt.target = {target!r}: must be empty when task.mt.source = 'synthetic'")
        n, words, max_len, seed = synthetic
        return generate_pairs(n, n_words=words, max_len=max_len, seed=seed)
    if source.startswith("sword:") or target.startswith("sword:"):
        if not (source.startswith("sword:") and target.startswith("sword:")):
            raise ConfigError(
                f"task.mt.source = {source!r}, task.mt.target = {target!r}: both must be sword:"
            )
        return align_modules(source[6:], target[6:], env)
    if not source or not target:
        raise ConfigError(f"task.mt.source = {source!r}, task.mt.target = {target!r}: name two text files")
    return read_parallel(source, target)


def _file_key(spec: str) -> str:
    """What identifies a data source in the fingerprint: a file's path, size and mtime; else the spec."""
    p = Path(spec).expanduser()
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return spec


def fingerprint(source: str, target: str, synthetic: tuple, val_fraction: float, max_tokens: int,
                data: DataConfig) -> str:  # fmt: skip
    vocab = data.vocab_size if data.tokenizer == "bpe" else 256
    gen = synthetic if source == "synthetic" else ()
    key = (
        f"evomoe-mt v{MT_FORMAT_VERSION}|{_file_key(source)}|{_file_key(target)}|gen={gen}|"
        f"val={val_fraction!r}|max={max_tokens}|tok={data.tokenizer}|vocab={vocab}"
    )
    return hashlib.sha256(key.encode()).hexdigest()


def _encode(tok: SpecialTokens, lines: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in tok.encode_lines(lines)]


def _build(text: ParallelText, val_fraction: float, max_tokens: int, data: DataConfig, log: Log) -> tuple:
    train_idx, val_idx = split_pairs(text, val_fraction)
    train_text = "\n".join([text.source[i] for i in train_idx] + [text.target[i] for i in train_idx])
    tok = SpecialTokens(train_tokenizer(data.tokenizer, train_text, data.vocab_size))
    src, tgt = _encode(tok, text.source), _encode(tok, text.target)
    fits = [len(s) <= max_tokens and len(t) + 1 <= max_tokens for s, t in zip(src, tgt)]
    text.n_long = fits.count(False)
    train_idx = [i for i in train_idx if fits[i]]
    val_idx = [i for i in val_idx if fits[i]]
    log(text.describe() + "".join(f"; {n}" for n in text.notes))
    if not train_idx or not val_idx:
        raise ConfigError(
            f"task.mt: {len(train_idx)} train / {len(val_idx)} validation pairs left after dropping "
            f"{text.n_empty} empty and {text.n_long} over model.seq_len={max_tokens} tokens; use more data"
        )
    return tok, src, tgt, train_idx, val_idx


def load_mt_data(
    source: str, target: str, *, synthetic: tuple[int, int, int, int], val_fraction: float, max_tokens: int,
    data: DataConfig, env: Mapping[str, str] = os.environ, log: Log = log_stderr,
) -> MTData:  # fmt: skip
    """The encoded pairs for this config, from the cache (built on first use)."""
    fp = fingerprint(source, target, synthetic, val_fraction, max_tokens, data)
    directory = resolve_cache_dir(data, env) / f"mt-{fp[:16]}"
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        meta, why = _check(directory, meta_path, fp)
        if meta is not None:
            return _load(directory, meta)
        log(f"warning: data: rebuilding translation cache {directory}: {why}")
    text = read_pairs(source, target, synthetic, env)
    tok, src, tgt, train_idx, val_idx = _build(text, val_fraction, max_tokens, data, log)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "tokenizer.json", lambda f: f.write(tok.to_json().encode("utf-8")))
    arrays = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for side, seqs in (("src", src), ("tgt", tgt)):
            arrays[f"{split}_{side}"] = np.concatenate([seqs[i] for i in idx]).astype(np.int32)
            arrays[f"{split}_{side}_len"] = np.array([len(seqs[i]) for i in idx], dtype=np.int64)
    write_atomic(directory / "pairs.npz", lambda f: np.savez(f, **arrays))
    meta = {
        "fingerprint": fp,
        "files": {n: {"sha256": sha256_file(directory / n)} for n in CHECKED},
        "origin": text.origin,
        "pairs": {"read": text.n_read, "empty": text.n_empty, "long": text.n_long},
        "train": len(train_idx),
        "val": len(val_idx),
        "val_src_text": [text.source[i] for i in val_idx],
        "val_ref_text": [text.target[i] for i in val_idx],
    }
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode("utf-8")))
    return _load(directory, meta)


CHECKED = ("tokenizer.json", "pairs.npz")


def _check(directory: Path, meta_path: Path, fp: str) -> tuple[dict | None, str]:
    """(meta, "") when the cache is this config's and its files are intact, else (None, why not)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"meta.json is unreadable ({e})"
    if meta.get("fingerprint") != fp:
        return None, "the data or config changed (fingerprint differs)"
    for name in CHECKED:
        want = meta.get("files", {}).get(name, {}).get("sha256")
        if not (directory / name).is_file():
            return None, f"{name} is missing"
        if want != sha256_file(directory / name):
            return None, f"{name} is corrupt (sha256 differs from meta.json)"
    return meta, ""


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else []


def _load(directory: Path, meta: dict) -> MTData:
    tok = load_tokenizer(directory)
    if not isinstance(tok, SpecialTokens):
        raise ValueError(f"'{directory}/tokenizer.json' has no special tokens: delete the directory")
    with np.load(directory / "pairs.npz") as z:
        parts = {k: _split(z[k], z[f"{k}_len"]) for k in ("train_src", "train_tgt", "val_src", "val_tgt")}
    return MTData(
        parts["train_src"], parts["train_tgt"], parts["val_src"], parts["val_tgt"],
        meta["val_src_text"], meta["val_ref_text"], tok, meta,
    )  # fmt: skip
