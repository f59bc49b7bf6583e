"""Per-step statistics accumulated on the device and flushed to ``metrics.jsonl`` at log time.

Row fields: step, phase, loss (mean LM loss over the interval), aux (unscaled aux losses), lr,
temperature, experts_per_token (mean over MoE layers and tokens), max_experts_per_token,
dropped_fraction, load_cv (coefficient of variation of tokens per expert, mean over MoE layers),
entropy (routing entropy, nats; entropy_layers: per MoE layer), tokens_per_expert (per MoE layer,
fractions), tokens_per_s, flops (cumulative training FLOPs actually executed), tokens (cumulative),
grad_norm, skipped_steps; experts_per_token_std, chunk_sparsity (share of experts an 8-token chunk of a
sequence never uses, mean over MoE layers), dead_experts (experts that received no token in the interval,
summed over MoE layers), and ``layers``: per MoE layer lists of k_mean, k_std, k_max (experts per token),
chunk_sparsity, load_cv, dead_experts. With expert parallelism the per-layer k and chunk figures are rank
0's tokens. The trainer adds expert_diversity and expert_diversity_layers (train/readout.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..moe.layer import LayerStats
from ..moe.stats import dead_experts, load_cv

LAYER_SUMS = ("tokens", "pairs", "k_sumsq", "chunk_empty", "chunk_slots")  # per layer, summed over steps


class IntervalStats:
    """Sums over the steps since the last log line, kept as tensors (one host sync per log)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.aux: dict[str, torch.Tensor] = {}
        self.tokens = 0.0
        self.pairs = 0.0
        self.dropped = 0.0
        self.max_k = 0.0
        self.entropy = 0.0
        self.counts: list[torch.Tensor] | None = None
        self.layers: list[dict] | None = None  # per MoE layer: LAYER_SUMS and max_k
        self.grad_norm = 0.0

    def add(self, loss: torch.Tensor, aux: dict, stats: list[LayerStats], grad_norm: torch.Tensor) -> None:
        self.steps += 1
        self.loss = self.loss + loss.detach().float()
        self.grad_norm = self.grad_norm + grad_norm.detach().float()
        for k, v in aux.items():
            self.aux[k] = self.aux.get(k, 0.0) + v.detach().float()
        if not stats:
            return
        n = len(stats)
        self.tokens = self.tokens + sum(s.tokens.float() for s in stats) / n
        self.pairs = self.pairs + sum(s.pairs.float() for s in stats) / n
        self.dropped = self.dropped + sum(s.dropped.float() for s in stats) / n
        self.max_k = torch.maximum(
            torch.as_tensor(self.max_k), max(s.max_experts_per_token.float() for s in stats)
        )
        # per MoE layer (an interval saved by an older release holds their mean: it broadcasts)
        self.entropy = self.entropy + torch.stack([s.entropy.float().to(loss.device) for s in stats])
        counts = [s.counts_E.float() for s in stats]
        if self.counts is None or any(a.shape != b.shape for a, b in zip(self.counts, counts)):
            self.counts = counts
            self.layers = None  # the layers changed shape (the spawn): start their sums afresh
        else:
            self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.add_layers(stats)

    def add_layers(self, stats: list[LayerStats]) -> None:
        zero = torch.zeros((), dtype=torch.float64)
        now = []
        for s in stats:
            d = {k: zero if getattr(s, k) is None else getattr(s, k).detach().double() for k in LAYER_SUMS}
            d["max_k"] = s.max_experts_per_token.detach().double()
            now.append(d)
        if self.layers is None or len(self.layers) != len(now):
            self.layers = now
            return
        for acc, d in zip(self.layers, now):
            for k in LAYER_SUMS:
                acc[k] = acc[k] + d[k]
            acc["max_k"] = torch.maximum(acc["max_k"], d["max_k"])

    FIELDS = (
        "steps",
        "loss",
        "aux",
        "tokens",
        "pairs",
        "dropped",
        "max_k",
        "entropy",
        "counts",
        "grad_norm",
        "layers",
    )

    def state_dict(self) -> dict:
        """The sums of a partly filled interval, for a checkpoint written between two log lines: a resumed
        run then logs the same row as an uninterrupted one (tensors are detached copies on the CPU)."""
        cpu = lambda v: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        state = {k: cpu(getattr(self, k)) for k in self.FIELDS if k not in ("aux", "counts", "layers")}
        state["aux"] = {k: cpu(v) for k, v in self.aux.items()}
        state["counts"] = None if self.counts is None else [cpu(c) for c in self.counts]
        state["layers"] = (
            None if self.layers is None else [{k: cpu(v) for k, v in d.items()} for d in self.layers]
        )
        return state

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.reset()
        for k in self.FIELDS:
            if k == "aux":
                self.aux = {name: dev(v) for name, v in state["aux"].items()}
            elif k == "counts":
                self.counts = None if state["counts"] is None else [dev(c) for c in state["counts"]]
            elif k == "layers":  # absent from checkpoints written before the per-layer statistics
                layers = state.get("layers")
                self.layers = None if layers is None else [{n: dev(v) for n, v in d.items()} for d in layers]
            else:
                setattr(self, k, dev(state[k]))

    def row(self) -> dict:
        n = max(self.steps, 1)
        item = lambda v: float(v) if not isinstance(v, torch.Tensor) else v.item()  # noqa: E731
        pairs, tokens, dropped = item(self.pairs), item(self.tokens), item(self.dropped)
        cvs, fractions = [], []
        for c in self.counts or []:
            mean = c.mean().item()
            cvs.append(c.std(unbiased=False).item() / mean if mean > 0 else 0.0)
            fractions.append([round(x, 5) for x in (c / c.sum().clamp_min(1)).tolist()])
        per_layer = self.layer_rows()
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "loss": item(self.loss) / n,
            "aux": {k: item(v) / n for k, v in self.aux.items()},
            "experts_per_token": pairs / tokens if tokens else 1.0,  # no MoE layer: one dense FFN per token
            "max_experts_per_token": item(self.max_k),
            "dropped_fraction": dropped / (pairs + dropped) if pairs + dropped else 0.0,
            "load_cv": sum(cvs) / len(cvs) if cvs else 0.0,
            "entropy": item(torch.as_tensor(self.entropy).float().mean()) / n,
            "entropy_layers": [round(float(x) / n, 5) for x in torch.as_tensor(self.entropy).reshape(-1)],
            "tokens_per_expert": fractions,
            "grad_norm": item(self.grad_norm) / n,
            "experts_per_token_std": mean(per_layer["k_std"]),
            "chunk_sparsity": mean(per_layer["chunk_sparsity"]),
            "dead_experts": sum(per_layer["dead_experts"]),
            "layers": per_layer,
        }

    def layer_rows(self) -> dict[str, list]:
        """Per MoE layer: experts per token (mean, std, max), chunk sparsity, load CV, dead experts."""
        out: dict[str, list] = {k: [] for k in ("k_mean", "k_std", "k_max", "chunk_sparsity")}
        for d in self.layers or []:
            tokens = max(d["tokens"].item(), 1.0)
            mean = d["pairs"].item() / tokens
            out["k_mean"].append(round(mean, 5))
            out["k_std"].append(round(math.sqrt(max(d["k_sumsq"].item() / tokens - mean * mean, 0.0)), 5))
            out["k_max"].append(d["max_k"].item())
            slots = d["chunk_slots"].item()
            out["chunk_sparsity"].append(round(d["chunk_empty"].item() / slots, 5) if slots else 0.0)
        out["load_cv"] = [round(load_cv(c), 5) for c in self.counts or []]
        out["dead_experts"] = [dead_experts(c) for c in self.counts or []]
        return out


def sanitize(row: dict) -> dict:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
        elif isinstance(v, dict):
            out[k] = sanitize(v)
        else:
            out[k] = v
    return out


class JsonlWriter:
    """Append-only JSON lines, flushed per row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(sanitize(row)) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    return rows


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep rows with step <= max_step (resume after a crash), rewriting atomically."""
    if not path.is_file():
        return
    rows = [r for r in read_jsonl(path) if r.get("step", -1) <= max_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
