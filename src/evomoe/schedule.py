"""Step -> value schedules, as explicit objects saved in and restored from checkpoints.

No global state: the trainer asks the schedules for the values of step ``s`` and hands them to the model.
The gate's clock starts at the spawn step (phase 2 begins), never at step 0.

With a FLOPs budget (``train.max_flops``) the schedules may follow the FLOPs executed instead of the step
count: the learning rate's cosine runs over the executed share of the budget (after a warmup in steps), and
with ``gate.clock = "flops"`` the temperature decay and the hard switch happen at shares of the budget. The
few values such a schedule learns while the run goes (the FLOPs at the end of the warmup and at the spawn,
the step of the hard switch) are recorded once by ``observe`` and saved with the schedule, so a resumed run
follows the same plan bitwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .registry import ROUTERS

PHASES = ("diversify", "sparsify", "sparse")


def decay_value(start: float, end: float, u: int, length: int, kind: str) -> float:
    """Value after u of ``length`` steps of a decay from ``start`` to ``end`` (held at ``end`` after)."""
    return decay_at(start, end, min(max(u, 0), length) / length, kind)


def clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def decay_at(start: float, end: float, frac: float, kind: str) -> float:
    """Value at fraction ``frac`` in [0, 1] of a decay from ``start`` to ``end``."""
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "exponential":
        return start * (end / start) ** frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown decay '{kind}' (choose from: linear, exponential, cosine)")


@dataclass
class LRSchedule:
    """Linear warmup, then cosine from ``lr`` to ``lr * min_ratio`` at ``total`` steps; with ``max_flops``
    > 0 the cosine runs over the FLOPs executed since the warmup ended (``start_flops``) up to the budget."""

    lr: float
    warmup: int
    total: int
    min_ratio: float = 0.1
    max_flops: float = 0.0
    start_flops: float | None = None  # FLOPs executed when the warmup ended (recorded by ``observe``)

    def observe(self, step: int, flops: float) -> None:
        """Called before each step with the FLOPs executed so far: records where the warmup ended."""
        if self.max_flops > 0 and step >= self.warmup and self.start_flops is None:
            self.start_flops = flops

    def __call__(self, step: int, flops: float = 0.0) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.max_flops > 0:
            start = flops if self.start_flops is None else self.start_flops
            frac = clamp01((flops - start) / max(self.max_flops - start, 1.0))
            return decay_at(self.lr, self.lr * self.min_ratio, frac, "cosine")
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
    hard_flops: float = 0.0  # > 0 (gate.clock = flops): the gate turns hard once this many FLOPs ran

    def observe(self, step: int, flops: float) -> None:
        """FLOPs clock: fix ``hard_after`` at the first step that starts with ``flops >= hard_flops``."""
        if self.hard_flops > 0 and self.phase(step) == "sparsify" and flops >= self.hard_flops:
            self.hard_after = step - self.spawn_step

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
    """tau from tau_max to tau_min over ``decay_steps`` counted from the spawn step, or (``clock = flops``)
    over the FLOPs executed from the spawn (``start_flops``, recorded by the trainer) to ``end_flops``."""

    tau_max: float
    tau_min: float
    decay_steps: int
    kind: str
    start_step: int
    clock: str = "steps"
    start_flops: float = 0.0
    end_flops: float = 0.0

    def progress(self, step: int, flops: float = 0.0) -> float:
        """Share of the decay done, in [0, 1] (routers with schedules of their own follow it too)."""
        if self.clock == "flops":
            span = self.end_flops - self.start_flops
            return 1.0 if span <= 0 else clamp01((flops - self.start_flops) / span)
        return min(max(step - self.start_step, 0), self.decay_steps) / self.decay_steps

    def __call__(self, step: int, flops: float = 0.0) -> float:
        return decay_at(self.tau_max, self.tau_min, self.progress(step, flops), self.kind)

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

    def observe(self, step: int, flops: float) -> None:
        """Before step ``step``, with the FLOPs executed so far: record what a FLOPs clock learns."""
        self.lr.observe(step, flops)
        self.phases.observe(step, flops)

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
    by_flops = g.clock == "flops" and t.max_flops > 0
    # FLOPs clock: the hard switch is fixed by ``observe`` when the budget share is reached
    hard_after, hard_flops = (t.steps, g.hard_at * t.max_flops) if by_flops else (g.hard_after, 0.0)
    decay_steps = g.decay_steps
    if g.clock == "flops" and not by_flops:  # no FLOPs budget: the same shares of the step budget
        decay_end = max(int(round(g.decay_until * t.steps)), spawn + 1)
        decay_steps = decay_end - spawn
        hard_after = max(int(round(g.hard_at * t.steps)), decay_end) - spawn
    clock = "flops" if by_flops else "steps"
    tau = TemperatureSchedule(g.tau_max, g.tau_min, decay_steps, g.decay, spawn, clock)
    tau.end_flops = g.decay_until * t.max_flops if by_flops else 0.0
    return Schedules(
        lr=LRSchedule(t.lr, t.warmup_steps, t.steps, t.min_lr_ratio, t.max_flops),
        phases=PhasePlan(spawn, hard_after, dense_to_sparse, cfg.moe.enabled, hard_flops),
        tau=tau,
    )
