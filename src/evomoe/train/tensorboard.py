"""A TensorBoard sink for the metrics rows (``train.tensorboard = true``): one event file under
``RUN/tensorboard``; open it with ``tensorboard --logdir RUN/tensorboard``.

Scalars: loss, lr, temperature, experts per token, load CV, grad norm, the aux losses, validation loss;
histograms: each MoE layer's share of (token, expert) pairs per expert (bucket e = expert e).
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

SCALARS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/temperature": "temperature",
    "moe/experts_per_token": "experts_per_token",
    "moe/max_experts_per_token": "max_experts_per_token",
    "moe/load_cv": "load_cv",
    "moe/dropped_fraction": "dropped_fraction",
    "moe/routing_entropy": "entropy",
    "train/grad_norm": "grad_norm",
    "train/tokens_per_s": "tokens_per_s",
}


class TensorBoardSink:
    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise ConfigError(
                "train.tensorboard = true needs the tensorboard package (pip install tensorboard)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: dict) -> None:
        """One metrics.jsonl row (written at each log line)."""
        step = int(row["step"])
        for tag, key in SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), step)
        for name, value in (row.get("aux") or {}).items():
            self.writer.add_scalar(f"aux/{name}", float(value), step)
        for layer, shares in enumerate(row.get("tokens_per_expert") or []):
            if len(shares) > 1:
                self.load_histogram(f"load/moe_layer_{layer}", shares, step)
        self.writer.flush()

    def load_histogram(self, tag: str, shares: list[float], step: int) -> None:
        """Bucket e holds expert e's share of the layer's pairs (so the histogram is the load profile)."""
        n = len(shares)
        self.writer.add_histogram_raw(
            tag,
            min=0.0,
            max=float(n - 1),
            num=float(sum(shares)),
            sum=float(sum(e * s for e, s in enumerate(shares))),
            sum_squares=float(sum(e * e * s for e, s in enumerate(shares))),
            bucket_limits=[e + 0.5 for e in range(n)],
            bucket_counts=list(map(float, shares)),
            global_step=step,
        )

    def write_eval(self, row: dict) -> None:
        step = int(row["step"])
        for key in ("val_loss", "val_ppl", "val_bpb", "experts_per_token"):
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(f"eval/{key}", float(row[key]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NullSink:
    """What a run without ``train.tensorboard`` (or a rank other than 0) writes: nothing."""

    def write(self, row: dict) -> None:
        pass

    def write_eval(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_sink(enabled: bool, log_dir: str | Path) -> TensorBoardSink | NullSink:
    return TensorBoardSink(log_dir) if enabled else NullSink()
