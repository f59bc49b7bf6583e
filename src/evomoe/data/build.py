"""Building a token cache: scan the documents, plan the shards, train the tokenizer, tokenize in parallel.

Each stage that reads the corpus runs in a pool of ``data.workers`` processes (0: one per core) when the
corpus spans more than one shard, with a progress bar; a small corpus is built in this process. The
stages hand each other file lists and document tables, never text, so the memory of every process is
bounded by one shard. What a build writes and how it is checked is in ``cache.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..config import ConfigError, DataConfig
from .corpus import CorpusListing, effective_dedup
from .documents import Source, file_kind, scan
from .shards import Plan, ShardSpec, encode_shard, make_plan, train_tokenizer_job
from .tokenizer import Tokenizer, tokenizer_from_json

Log = Callable[[str], None]
SCAN_BATCH_BYTES = 8 << 20  # files per scan job: about this many bytes


def sources_of(listing: CorpusListing, cfg: DataConfig) -> list[Source]:
    single = listing.kind == "file" and file_kind(listing.files[0].rel) == "text"
    return [
        Source(f, file_kind(f.rel), cfg.text_field, single=single, val_fraction=cfg.val_fraction)
        for f in listing.files
    ]


def n_workers(cfg: DataConfig, jobs: int) -> int:
    return max(1, min(cfg.workers or os.cpu_count() or 1, jobs))


class Stage:
    """A progress bar on a terminal, else a log line per quarter; and the stage's time."""

    def __init__(self, label: str, total: int, log: Log) -> None:
        self.label, self.total, self.log, self.done = label, max(total, 1), log, 0
        self.tic, self.bar, self.task = time.perf_counter(), None, None
        if sys.stderr.isatty():
            from rich.progress import Progress  # noqa: PLC0415 - only on a terminal

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(label, total=self.total)
            self.bar.start()

    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.done * 4 // self.total > before * 4 // self.total and self.done < self.total:
            self.log(f"data: {self.label}: {self.done}/{self.total}")

    def close(self) -> float:
        if self.bar is not None:
            self.bar.stop()
        return time.perf_counter() - self.tic


@contextmanager
def pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes (spawned: the parent may hold threads), or None to work in this process."""
    if workers <= 1:
        yield None
        return
    env_before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            yield ex
    finally:
        if env_before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = env_before


def run_jobs(ex, fn: Callable, jobs: list[tuple], stage: Stage, weights: Iterable[int] | None = None) -> list:
    """``fn(*job)`` for every job, results in job order; the stage advances by each job's weight."""
    weights = list(weights) if weights is not None else [1] * len(jobs)
    if ex is None:
        out = []
        for job, w in zip(jobs, weights):
            out.append(fn(*job))
            stage.advance(w)
        return out
    futures = [ex.submit(fn, *job) for job in jobs]
    for fut, w in zip(futures, weights):
        fut.result()
        stage.advance(w)
    return [f.result() for f in futures]


def scan_files(sources: list[Source], start: int) -> list[np.ndarray]:
    return [scan(start + i, s) for i, s in enumerate(sources)]


def scan_all(ex, sources: list[Source], log: Log) -> list[np.ndarray]:
    """Every file's documents; jobs of about SCAN_BATCH_BYTES of files."""
    jobs, sizes, lo, acc = [], [], 0, 0
    for i, s in enumerate(sources):
        acc += s.file.size
        if acc >= SCAN_BATCH_BYTES or i == len(sources) - 1:
            jobs.append((sources[lo : i + 1], lo))
            sizes.append(i + 1 - lo)
            lo, acc = i + 1, 0
    stage = Stage("scanning files", len(sources), log)
    tables = [t for part in run_jobs(ex, scan_files, jobs, stage, sizes) for t in part]
    stage.close()
    return tables


@dataclass
class Built:
    plan: Plan
    tokenizer: Tokenizer
    shards: list[dict]  # per ShardSpec: tokens, size, sha256, text_bytes, counts
    seconds: dict[str, float]
    workers: int


def build_shards(
    cfg: DataConfig, listing: CorpusListing, directory: Path, dtype_of: Callable[[int], np.dtype], log: Log,
    tokenizer: Tokenizer | None = None,
) -> Built:  # fmt: skip
    """Scan, plan, train the tokenizer (unless given), and write every shard into ``directory``."""
    sources = sources_of(listing, cfg)
    est_shards = sum(f.size for f in listing.files) // max(cfg.shard_bytes, 1) + 1
    workers = n_workers(cfg, est_shards if est_shards > 1 else 1)
    seconds: dict[str, float] = {}
    with pool(workers) as ex:
        tic = time.perf_counter()
        tables = scan_all(ex, sources, log)
        dedup = effective_dedup(cfg, listing.kind)
        plan = make_plan(sources, tables, cfg.val_fraction, dedup, cfg.max_bytes, cfg.shard_bytes)
        del tables
        if not len(plan.docs):
            raise ConfigError(
                f"data.corpus = {cfg.corpus!r}: the corpus has no text ({plan.n_binary} binary files "
                f"skipped under '{listing.root}'); point data.corpus at text files"
            )
        seconds["scan"] = time.perf_counter() - tic
        if tokenizer is None:
            stage = Stage("training the tokenizer", 1, log)
            job = (sources, plan.docs, plan.shards, cfg.tokenizer, cfg.vocab_size)
            tokenizer = tokenizer_from_json_str(run_jobs(ex, train_tokenizer_job, [job], stage)[0])
            seconds["tokenizer"] = stage.close()
        shards = encode_all(ex, sources, plan, plan.shards, tokenizer, directory, dtype_of, log)
        seconds["tokenize"] = shards[1]
    return Built(plan, tokenizer, shards[0], seconds, workers)


def tokenizer_from_json_str(text: str) -> Tokenizer:
    return tokenizer_from_json(json.loads(text), "<build>")


def encode_all(
    ex, sources: list[Source], plan: Plan, specs: list[ShardSpec], tokenizer: Tokenizer, directory: Path,
    dtype_of: Callable[[int], np.dtype], log: Log,
) -> tuple[list[dict], float]:  # fmt: skip
    """Tokenize the shards ``specs`` of ``plan`` into ``directory``; their records and the stage's time."""
    dtype = dtype_of(tokenizer.vocab_size).name
    tok_json = tokenizer.to_json()
    jobs = [
        (sources, plan.docs[s.lo : s.hi], tok_json, str(directory / s.file), dtype, tokenizer.vocab_size)
        for s in specs
    ]
    sizes = [int(plan.docs["nbytes"][s.lo : s.hi].sum()) >> 10 for s in specs]
    stage = Stage(f"tokenizing {len(specs)} shard(s)", sum(sizes), log)
    out = run_jobs(ex, encode_shard, jobs, stage, sizes)
    return out, stage.close()


def rebuild_shards(
    cfg: DataConfig, listing: CorpusListing, plan: Plan, specs: list[ShardSpec], tokenizer: Tokenizer,
    directory: Path, dtype_of: Callable[[int], np.dtype], log: Log,
) -> list[dict]:  # fmt: skip
    """Tokenize again only the shards ``specs`` (damaged ones), with the cache's own plan and tokenizer."""
    sources = sources_of(listing, cfg)
    with pool(n_workers(cfg, len(specs))) as ex:
        return encode_all(ex, sources, plan, specs, tokenizer, directory, dtype_of, log)[0]
