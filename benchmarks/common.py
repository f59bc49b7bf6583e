"""Shared helpers of the benchmarks: import path, interleaved timing, peak memory, tables and JSON.

Timing rule: candidates are measured in the same process, interleaved round by round (the order rotates
every round), and every figure of merit is the median over rounds of a per-round ratio. On a shared,
noisy machine (other jobs on the same cores) this cancels most of the drift that absolute times carry.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning. On a 2-core machine shared
# with other jobs, spinning workers hold the cores that the other thread of a parallel region waits for:
# measured 6.4 ms per parallel region instead of 33 us (docs/performance.md). Set it to ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench_results"

try:  # the installed package first, else the source tree next to this folder
    import evomoe  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the repo is set up
    sys.path.insert(0, str(ROOT / "src"))
    import evomoe  # noqa: F401

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- setup
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a reduced grid that finishes in under 2 minutes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (0: the mode's default)")
    p.add_argument(
        "--out", default="", help="JSON path (default: bench_results/<name>[-quick]-<device>.json)"
    )
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def loadavg() -> float:
    """The 1-minute load average (other jobs on the same cores), or -1 where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def machine(device: torch.device) -> dict:
    info = {
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": loadavg(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- timing
def interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int = 5,
    warmup: int = 1,
    baseline: str | None = None,
) -> dict[str, dict[str, float]]:
    """Time each callable ``rounds`` times, interleaved; ratios are taken per round against ``baseline``.

    Returns {name: {"ms": median wall ms, "ratio": median of per-round wall time / baseline's,
    "cpu_ratio": the same with this process's CPU time (less sensitive to being descheduled),
    "spread": half the range of the per-round ratios}}.
    """
    names = list(fns)
    baseline = baseline or names[0]
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            gc.collect()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[baseline], strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu[n], cpu[baseline], strict=True)]
        out[n] = {
            "ms": 1e3 * statistics.median(times[n]),
            "ratio": statistics.median(ratios),
            "cpu_ratio": statistics.median(cpu_ratios),
            "spread": (max(ratios) - min(ratios)) / 2,
            "rounds_s": times[n],  # wall seconds of each round (per-round ratios against other baselines)
            "rounds_cpu_s": cpu[n],
        }
    return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was live before it (CUDA: the caching allocator's
    counters; CPU: the profiler's allocation events, summed in time order)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


# ----------------------------------------------------------------------------------------------- output
def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def print_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """A GitHub-markdown table of ``rows`` (missing cells print as '-'); returned and printed."""
    cells = [[fmt(r.get(c, "-")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, args: argparse.Namespace, device: torch.device, payload: dict) -> Path:
    tag = f"{name}{'-quick' if getattr(args, 'quick', False) else ''}-{device.type}"
    path = Path(args.out) if args.out else RESULTS / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "argv": sys.argv[1:], "machine": machine(device), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path
