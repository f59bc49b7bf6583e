"""How the trainer runs a step: ``train.compile`` (torch.compile) and ``train.precision`` (bf16 autocast).

``train.compile = true`` compiles the model's forward (every block, the head) and the task's loss with
static shapes (``dynamic=False``). The MoE layer's routed path (router, dispatch with a row count per expert
that changes every step, experts, combine, statistics) is ``torch.compiler.disable``d in
``moe.layer.MoELayer.forward_routed``: it runs eagerly between compiled regions, so schedule values (the
DTS temperature, the hard flag) never enter a graph and never recompile, and a run resumed from a checkpoint
runs the same static graphs as the uninterrupted one (bitwise on CPU). Phase changes recompile a bounded
number of times: the spawn (a router appears), train vs eval (and ``no_grad``), an eval batch of another
shape.

``train.precision = "bf16"``: autocast to bfloat16; parameters, gradients and the optimizer state stay fp32
(the master weights), routers compute in fp32 (they turn autocast off), the attention softmax and the loss
are computed in fp32. On CPU attention is spelled out in matmuls under bf16
(``models.blocks.math_attention``): the fused kernel's bf16 backward is several times slower there.

Run to run: a compiled CPU run keeps torch's deterministic algorithms on (``StepMode.running``), else the
embedding's backward sums with atomic adds in an order that changes between runs at two threads and more.

``train.compile = "auto"`` (``resolve_compile``): compiled where it is faster. Measured on CPU
(docs/performance.md): a compiled step is 1.05-1.1x an eager one in fp32 and 1.3-1.95x in bf16, after a
warm-up of 6-16 s at the first step, so auto compiles when a compiler backend is found (a C++ compiler on
CPU, Triton on CUDA), on one process, for a task with fixed batch shapes, and for a run of at least
``AUTO_MIN_STEPS`` steps (shorter runs would not repay the warm-up). The decision and its reason are logged.

Counters (``torch._dynamo.utils.counters``): graphs compiled, graph breaks, frames compiled after the first
step (recompiles); the trainer logs them with the warm-up time of the first step and whenever they change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

# phases, train/eval, no_grad and eval shapes each add a cache entry per compiled frame
RECOMPILE_LIMIT = 64
AUTO_MIN_STEPS = 500  # train.compile = "auto": shorter runs stay eager (the warm-up would not pay)


def compiler_backend(device: torch.device) -> str | None:
    """What inductor would compile with on ``device``, or None: a C++ compiler on CPU ($CXX, c++, g++,
    clang++), Triton on CUDA."""
    if device.type == "cpu":
        for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
            if name and shutil.which(name):
                return name
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton  # noqa: PLC0415

        return "triton" if has_triton() else None
    return None


def resolve_compile(
    setting: bool | str, device: torch.device, steps: int, world_size: int = 1, fixed_shapes: bool = True
) -> tuple[bool, str]:
    """``train.compile`` as a decision and its reason. true / false are kept (``StepMode`` still turns a
    true off where compiling is not supported); "auto": on where it is faster (module doc)."""
    if setting != "auto":
        return bool(setting), "set"
    if world_size > 1:
        return False, f"{world_size} processes (the compiled step is tested on one only)"
    if not fixed_shapes:
        return False, "this task's batches change shape"
    if steps < AUTO_MIN_STEPS:
        return False, f"train.steps = {steps} < {AUTO_MIN_STEPS}: the warm-up would not pay"
    backend = compiler_backend(device)
    if backend is None:
        return False, f"no compiler for {device.type} (a C++ compiler on CPU, Triton on CUDA)"
    return True, f"{device.type} with {backend}, {steps} steps"


def compile_counts() -> dict[str, int]:
    """Process-wide dynamo counters: frames compiled, graphs, graph breaks (each break site once per frame
    compiled)."""
    return {
        "frames": int(counters["frames"].get("ok", 0)),
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def graph_break_reasons() -> list[str]:
    """The first line of each distinct graph-break reason seen so far."""
    return sorted({reason.splitlines()[0] for reason in counters["graph_break"]})


class StepMode:
    """The trainer's precision and compilation policy (one per trainer)."""

    def __init__(
        self,
        compile_: bool,
        precision: str,
        device: torch.device,
        log: Callable[[str], None],
        fresh: bool = True,
        world_size: int = 1,
        fixed_shapes: bool = True,
    ):
        """``fresh``: start from an empty compile cache (the trainer; benchmarks keep several models).
        Several processes (torchrun): eager, the compiled step is not tested with DDP / FSDP / EP there.
        A task whose batches change shape (``Task.fixed_shapes`` false: MT) runs eager too."""
        if compile_ and world_size > 1:
            log(f"train.compile: not applied with {world_size} processes (tested on one process only)")
            compile_ = False
        if compile_ and not fixed_shapes:
            log("train.compile: not applied: this task's batches change shape (a static graph per shape)")
            compile_ = False
        self.compile, self.precision, self.device, self.log = compile_, precision, device, log
        self.after_first: dict[str, int] | None = None
        self.last: dict[str, int] = {}
        if compile_:
            # a fresh cache per run: graphs compiled for an earlier model in this process would be reused
            # through recompiles that round differently (measured: ~1e-7 relative from step 1 in bf16), so
            # a run's numbers would depend on what ran before it; reset, every run matches a fresh process
            if fresh:
                torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.start = compile_counts()

    @classmethod
    def of(cls, trainer) -> StepMode:
        """The mode of a ``Trainer``: its ``train.compile``, ``train.precision``, device, processes, task."""
        t, par = trainer.cfg.train, trainer.par
        fixed = trainer.task.fixed_shapes
        compile_, why = resolve_compile(t.compile, trainer.device, t.steps, par.world_size, fixed)
        if t.compile == "auto":
            trainer.log(f"train.compile = auto: {'compiled' if compile_ else 'eager'} ({why})")
        return cls(
            compile_, t.precision, trainer.device, trainer.log, world_size=par.world_size, fixed_shapes=fixed
        )

    @contextlib.contextmanager
    def running(self):
        """The scope of a compiled run on CPU: torch's deterministic algorithms on. Inductor lowers an
        accumulating scatter (the embedding's backward) to atomic adds in a parallel loop, whose order, and so
        whose rounding, changes from run to run at two threads and more (measured: the token embedding's
        gradient differed between two calls on the same batch); with the flag it keeps the aten kernel.
        Uninitialised memory is left as is (the flag would fill every ``torch.empty``). Both settings are
        restored on exit."""
        if not (self.compile and self.device.type == "cpu"):
            yield
            return
        was = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was[0], warn_only=was[1])
            torch.utils.deterministic.fill_uninitialized_memory = fill

    def autocast(self):
        enabled = self.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def wrap(self, fn):
        """``fn`` (a module or a function) compiled with static shapes, or ``fn`` itself when eager."""
        return torch.compile(fn, dynamic=False) if self.compile else fn

    def counts(self) -> dict[str, int]:
        now = compile_counts()
        return {k: now[k] - self.start[k] for k in now}

    def after_step(self, step: int, seconds: float) -> None:
        """Logs the compile warm-up (the first step's time) and later recompiles, with the counters."""
        if not self.compile:
            return
        now = self.counts()
        if self.after_first is None:
            self.after_first = self.last = now
            breaks = "; ".join(graph_break_reasons()) if now["graph_breaks"] else "none"
            self.log(
                f"train.compile: step {step + 1} took {seconds:.1f} s (compile warm-up): "
                f"{now['graphs']} graphs, {now['graph_breaks']} graph breaks ({breaks})"
            )
        elif now != self.last:
            self.last = now
            recompiles = now["frames"] - self.after_first["frames"]
            self.log(
                f"train.compile: recompiled by step {step + 1} ({recompiles} frames since step 1, "
                f"{now['graphs']} graphs, {now['graph_breaks']} graph breaks in all)"
            )
