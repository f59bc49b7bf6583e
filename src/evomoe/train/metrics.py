"""Per-step statistics accumulated on the device and flushed to ``metrics.jsonl`` at log time.

Row fields: step, phase, loss (mean LM loss over the interval), aux (unscaled aux losses), lr,
temperature, experts_per_token (mean over MoE layers and tokens), max_experts_per_token,
dropped_fraction, load_cv (coefficient of variation of tokens per expert, mean over MoE layers),
entropy (routing entropy, nats; entropy_layers: per MoE layer), tokens_per_expert (per MoE layer,
fractions), tokens_per_s, flops (cumulative training FLOPs actually executed), tokens (cumulative),
grad_norm, skipped_steps. The trainer adds expert_diversity and expert_diversity_layers (train/readout.py).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..moe.layer import LayerStats


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
        else:
            self.counts = [a + b for a, b in zip(self.counts, counts)]

    FIELDS = ("steps", "loss", "aux", "tokens", "pairs", "dropped", "max_k", "entropy", "counts", "grad_norm")

    def state_dict(self) -> dict:
        """The sums of a partly filled interval, for a checkpoint written between two log lines: a resumed
        run then logs the same row as an uninterrupted one (tensors are detached copies on the CPU)."""
        cpu = lambda v: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        state = {k: cpu(getattr(self, k)) for k in self.FIELDS if k not in ("aux", "counts")}
        state["aux"] = {k: cpu(v) for k, v in self.aux.items()}
        state["counts"] = None if self.counts is None else [cpu(c) for c in self.counts]
        return state

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.reset()
        for k in self.FIELDS:
            if k == "aux":
                self.aux = {name: dev(v) for name, v in state["aux"].items()}
            elif k == "counts":
                self.counts = None if state["counts"] is None else [dev(c) for c in state["counts"]]
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
        }


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
