"""Step -> value schedules, as explicit objects saved in and restored from checkpoints.

No global state: the trainer asks the schedules for the values of step ``s`` and hands them to the model.
The gate's clock starts at the spawn step (phase 2 begins), never at step 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .registry import ROUTERS

PHASES = ("diversify", "sparsify", "sparse")


def decay_value(start: float, end: float, u: int, length: int, kind: str) -> float:
    """Value after u of ``length`` steps of a decay from ``start`` to ``end`` (held at ``end`` after)."""
    frac = min(max(u, 0), length) / length
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "exponential":
        return start * (end / start) ** frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown decay '{kind}' (choose from: linear, exponential, cosine)")


@dataclass
class LRSchedule:
    """Linear warmup, then cosine from ``lr`` to ``lr * min_ratio`` at ``total`` steps."""

    lr: float
    warmup: int
    total: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        return decay_value(self.lr, self.lr * self.min_ratio, step - self.warmup, span, "cosine")

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhasePlan:
    """Where the run is: ``diversify`` [0, spawn), ``sparsify`` [spawn, spawn + hard_after) for a
    dense-to-sparse router (its soft phase), and ``sparse`` afterwards (every other router is sparse at once).
    ``moe=False`` (the dense baseline) stays in ``diversify`` (one dense FFN per block) for the whole run.
    """

    spawn_step: int
    hard_after: int
    dense_to_sparse: bool  # the router has a soft phase (``Router.dense_to_sparse``)
    moe: bool = True

    def phase(self, step: int) -> str:
        if not self.moe or step < self.spawn_step:
            return "diversify"
        if self.dense_to_sparse and step - self.spawn_step < self.hard_after:
            return "sparsify"
        return "sparse"

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass
class TemperatureSchedule:
    """tau(u) from tau_max to tau_min over ``decay_steps``, u counted from the spawn step."""

    tau_max: float
    tau_min: float
    decay_steps: int
    kind: str
    start_step: int

    def __call__(self, step: int) -> float:
        return decay_value(self.tau_max, self.tau_min, step - self.start_step, self.decay_steps, self.kind)

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass
class Schedules:
    """The run's plan, fixed when it starts and saved in its checkpoints: a resumed run keeps it even when
    ``train.steps`` changes (the learning rate's horizon, ``lr.total``, is also the routers' plan)."""

    lr: LRSchedule
    phases: PhasePlan
    tau: TemperatureSchedule

    @property
    def total_steps(self) -> int:
        return self.lr.total

    def state_dict(self) -> dict:
        return {"lr": self.lr.state_dict(), "phases": self.phases.state_dict(), "tau": self.tau.state_dict()}

    @classmethod
    def from_state_dict(cls, d: dict) -> Schedules:
        """Also reads the first release's state (which held a StableMoE ``stage2_step``, now derived)."""
        return cls(LRSchedule(**d["lr"]), PhasePlan(**d["phases"]), TemperatureSchedule(**d["tau"]))


def build_schedules(cfg) -> Schedules:
    t, g, e = cfg.train, cfg.gate, cfg.evolve
    spawn = e.diversify_steps
    dense_to_sparse = ROUTERS.get(cfg.router.name).dense_to_sparse
    return Schedules(
        lr=LRSchedule(t.lr, t.warmup_steps, t.steps, t.min_lr_ratio),
        phases=PhasePlan(spawn, g.hard_after, dense_to_sparse, cfg.moe.enabled),
        tau=TemperatureSchedule(g.tau_max, g.tau_min, g.decay_steps, g.decay, spawn),
    )
