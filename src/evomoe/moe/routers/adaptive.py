"""BlockFFN's adaptive loss coefficient (``AdaptiveLinearScheduler``), driven by the loss history.

After ``stable_steps`` optimizer steps, at the end of every window of ``window_steps`` steps:
ratio = mean(loss over this window) / mean(loss over the previous one); a ratio above 1 is raised to at
least ``min_ratio``; over the next window the coefficient moves linearly from its current value to
coefficient * ratio, kept within [initial, ``max_factor`` * initial] (the lower bound is our choice: the
source only caps it). So the coefficient ratchets up while the loss rises and relaxes as it falls.
All state is in persistent buffers (float64, exact across a checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn


def next_target(coef: float, ratio: float, init: float, max_factor: float, min_ratio: float) -> float:
    if ratio > 1.0:
        ratio = max(ratio, min_ratio)
    return min(max(coef * ratio, init), init * max_factor)


class AdaptiveCoefficient(nn.Module):
    def __init__(self, init: float, opts) -> None:
        super().__init__()
        self.init, self.opts = init, opts
        f64 = dict(dtype=torch.float64)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_sum", torch.zeros((), **f64))  # loss summed over this window's steps
        self.register_buffer("window_n", torch.zeros((), **f64))
        self.register_buffer("prev_mean", torch.full((), -1.0, **f64))  # -1: no window closed yet
        self.register_buffer("start", torch.full((), init, **f64))  # coefficient at the window start
        self.register_buffer("target", torch.full((), init, **f64))

    def value(self) -> float:
        """The coefficient now: linear from ``start`` to ``target`` over the current window."""
        o = self.opts
        if not o.adaptive:
            return self.init
        u = max(int(self.steps) - o.stable_steps, 0) % o.window_steps
        start, target = float(self.start), float(self.target)
        return start + (target - start) * u / o.window_steps

    @torch.no_grad()
    def observe(self, loss: torch.Tensor) -> None:
        self.window_sum += loss.double()
        self.window_n += 1

    @torch.no_grad()
    def on_step(self) -> None:
        o = self.opts
        self.steps += 1
        u = int(self.steps) - o.stable_steps
        if not o.adaptive or u <= 0 or u % o.window_steps:
            if u <= 0:  # nothing before the stable phase counts toward a window
                self.window_sum.zero_()
                self.window_n.zero_()
            return
        mean = float(self.window_sum) / max(float(self.window_n), 1.0)
        now = float(self.target)  # the window's ramp has arrived
        if float(self.prev_mean) > 0:
            ratio = mean / float(self.prev_mean)
            self.start.fill_(now)
            self.target.fill_(next_target(now, ratio, self.init, o.max_factor, o.min_ratio))
        else:
            self.start.fill_(now)
            self.target.fill_(now)
        self.prev_mean.fill_(mean)
        self.window_sum.zero_()
        self.window_n.zero_()
