"""The training loop: phases (diversify -> sparsify -> sparse), eval, checkpoints, metrics, report.

The trainer drives a task and a model through their interfaces (``tasks.base.Task``, ``models.MoEModel``)
and knows neither by name, nor any router. One step: schedules give lr, temperature and the hard flag; the
task gives the batch and the loss, the model its output and aux losses; non-finite steps are skipped;
statistics stay on the device until a log line; then every router's ``on_step`` hook runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import Config, to_dict
from ..moe.router import GateState
from ..parallel.base import NullWriter, make_parallel
from ..registry import ROUTERS
from ..schedule import Schedules, build_schedules
from ..tasks.base import Batch, EvalContext
from ..tasks.flops import step_flops
from . import checkpoint as ckpt
from .checkpoint import rng_state, set_rng_state
from .compile import StepMode
from .metrics import IntervalStats, JsonlWriter, truncate_jsonl
from .optim import build_optimizer, rebuild_after_spawn, set_lr
from .pretrained import build_model, resolve_pretrained
from .readout import expert_diversity_row, host_scalars
from .setup import Micro, RunState, TrainingError, build_task, check_accumulation, model_class, pick_device
from .tensorboard import open_sink


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
        data=None,
    ) -> None:
        self.cfg, self.out, self.log, self.show_progress = cfg, Path(out_dir), log, progress
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        # parallel: NoParallel (plain single-device behaviour) unless launched by torchrun (WORLD_SIZE > 1)
        self.par = make_parallel(cfg, env or {}, self.device, log)
        self.show_progress = progress and self.par.is_main
        check_accumulation(t.batch_size, t.accum_steps, self.par.world_size)
        torch.manual_seed(t.seed)
        resolve_pretrained(cfg)  # model.init_from: the model's shape from its directory
        self.task = self.par.main_first(lambda: build_task(cfg, env or {}, log, data))
        self._set_vocab_size()
        self.model = build_model(cfg, model_class(cfg)).to(self.device)
        self.router_info = self._router_info()
        self.schedules: Schedules = build_schedules(cfg)
        self.spawn_gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 17)
        # an imported model spawns from its pretrained MLPs at step 0 instead (train_step)
        if cfg.moe.enabled and cfg.evolve.diversify_steps == 0 and not cfg.model.init_from:
            self.par.fresh_experts(self.model, cfg, self.spawn_gen, self.router_info)
            self.model.to(self.device)
        self.mode = StepMode.of(self)  # train.compile, train.precision
        self.fwd = self.mode.wrap(self.par.wrap(self.model))  # training forwards (DDP / FSDP / model)
        self.eval_fwd, self.loss_fn = self.mode.wrap(self.model), self.mode.wrap(self.task.loss)
        self.opt = self.par.prepare_optimizer(build_optimizer(self.model, t))
        self.state = RunState()
        self.stop_requested: str | None = None
        self.interval = IntervalStats()

    # ------------------------------------------------------------------------------------------ setup
    def _set_vocab_size(self) -> None:
        m, vocab = self.cfg.model, self.task.vocab_size
        if m.vocab_size == 0:
            m.vocab_size = vocab
        elif m.vocab_size < vocab:
            raise TrainingError(
                f"model.vocab_size = {m.vocab_size} is smaller than the tokenizer's {vocab} "
                "(set it to 0 to take the tokenizer's)"
            )

    def _router_info(self) -> dict:
        """What the configured router declared it needs (``Router.needs``), from the task."""
        info: dict = {"vocab_size": self.cfg.model.vocab_size}
        if self.cfg.moe.enabled and "token_counts" in ROUTERS.get(self.cfg.router.name).needs:
            info["token_counts"] = self.task.token_counts()
        return info

    def spawn(self) -> None:
        self.schedules.tau.start_flops = self.state.flops  # a FLOPs clock counts from the spawn
        mapping = self.par.spawn_model(self.model, self.cfg, self.spawn_gen, self.router_info)
        self.model.to(self.device)
        opt = rebuild_after_spawn(self.opt, self.model, self.cfg.train, mapping, self.cfg.evolve.opt_state)
        self.opt = self.par.prepare_optimizer(opt)

    def gate_state(self, step: int, train_selection: bool = False) -> GateState:
        """The schedule values of ``step`` (FLOPs clocks read the FLOPs executed before it)."""
        s, flops = self.schedules, self.state.flops
        hard = s.phases.phase(step) == "sparse"
        tau, progress = s.tau(step, flops), s.tau.progress(step, flops)
        return GateState(tau, hard, step, s.phases.spawn_step, s.total_steps, progress, train_selection)

    def budget_spent(self) -> bool:
        """The FLOPs budget (``train.max_flops``) is reached: the run ends after the step that crossed it."""
        return 0 < self.cfg.train.max_flops <= self.state.flops

    # ------------------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        return {
            "step": self.state.step,
            "run": asdict(self.state),
            "spawned": self.model.spawned,
            "schema": self.cfg.schema,
            "optimizer": self.par.full_optimizer_state(self.opt),
            "schedules": self.schedules.state_dict(),
            "rng": rng_state(),
            "spawn_rng": self.spawn_gen.get_state(),
            "config": to_dict(self.cfg),
            # the partly filled log interval, so a resumed run logs the same rows; with several ranks each
            # holds only its own sums, so a resumed multi-process run starts the interval afresh
            "interval": self.interval.state_dict() if self.par.world_size == 1 else None,
        }

    def save(self) -> Path | None:
        """Every rank gathers (experts by global id); rank 0 writes; all wait for the complete checkpoint."""
        weights, state = self.par.full_state_dict(self.model), self.trainer_state()
        path = None
        if self.par.is_main:
            root, keep = self.out / "checkpoints", self.cfg.train.keep_checkpoints
            path = ckpt.save_checkpoint(root, self.state.step, self.model, state, keep, weights)
        self.par.barrier()
        return path

    def restore(self, path: Path, truncate_logs: bool = True) -> None:
        ts = ckpt.load_trainer_state(path)
        if ts["spawned"] and not self.model.spawned:
            self.spawn()
        try:
            self.par.load_weights(self.model, path, ckpt.load_weights)
            self.opt.load_state_dict(self.par.shard_optimizer_state(ts["optimizer"], self.opt))
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(
                f"checkpoint '{path}' does not match this run's config ({str(e).splitlines()[0][:200]})"
            ) from None
        self.schedules = Schedules.from_state_dict(ts["schedules"])
        self.state = RunState(**ts["run"])
        set_rng_state(ts["rng"])
        self.par.align_rng(ts["rng"])
        self.spawn_gen.set_state(ts["spawn_rng"])
        if ts.get("interval") is not None and self.par.world_size == 1:
            self.interval.load_state_dict(ts["interval"], self.device)
        for name in ("metrics.jsonl", "eval.jsonl") if truncate_logs and self.par.is_main else ():
            truncate_jsonl(self.out / name, self.state.step)

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, step: int, interval: IntervalStats) -> None:
        cfg = self.cfg
        if cfg.moe.enabled and not self.model.spawned and step >= self.schedules.phases.spawn_step:
            self.spawn()
        self.schedules.observe(step, self.state.flops)
        self.step_lr, self.step_gate = self.schedules.lr(step, self.state.flops), self.gate_state(step)
        set_lr(self.opt, self.step_lr)
        batch = self.task.train_batch(step)
        micro = self.forward_backward(self.local(batch))  # this rank's rows of the global batch
        self.par.sync_grads(self.model)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        # per-parameter norms before clipping (which spreads a NaN to every gradient), to name the layer;
        # FSDP holds DTensor gradients: their local shards are enough for that
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        pre_clip_norms = torch._foreach_norm(grads) if grads else []
        grad_norm = self.par.clip_grad_norm(self.model, params, clip)
        finite, flops = True, 0.0
        for m in micro:
            ok, f = self.step_scalars(m.loss + m.aux_loss, grad_norm, m, m.batch)
            finite, flops = finite and ok, flops + f
        finite, flops = self.par.reduce_step(finite, flops, self.stop_requested)  # agreed by all ranks
        loss = micro[0].loss if len(micro) == 1 else torch.stack([m.loss for m in micro]).mean()
        if not finite:
            self.skip_step(step, loss, params, pre_clip_norms)
        else:
            self.opt.step()
            self.state.skipped_in_a_row = 0
        self.opt.zero_grad(set_to_none=True)
        for layer in self.model.moe_layers():  # router hooks (bias updates, adaptive coefficients, ...)
            if layer.router is not None:
                layer.router.on_step(step)
        for m in micro:
            interval.add(m.loss, m.aux, m.stats, grad_norm)
        self.state.flops += flops
        self.state.tokens += batch.num_tokens

    def forward_backward(self, local: Batch) -> list[Micro]:
        """Forward and backward over this rank's rows in ``train.accum_steps`` micro-batches (row blocks):
        each one's loss and aux loss divided by their number, so the gradients add up to those of the mean;
        data-parallel gradients are reduced once, after the last. Keeps only what the step reads later."""
        n = self.cfg.train.accum_steps
        parts = [local] if n == 1 else [local.map(lambda t, i=i: t.tensor_split(n)[i]) for i in range(n)]
        micro = []
        for i, part in enumerate(parts):
            no_sync = getattr(self.fwd, "no_sync", None) if i < n - 1 else None
            with self.mode.autocast(), (no_sync() if no_sync else contextlib.nullcontext()):
                out = self.fwd(**part.inputs, gate=self.step_gate)
                loss = self.loss_fn(out, part)
                total = loss + out.aux_loss
                (total if n == 1 else total / n).backward()
            aux = {k: v.detach() for k, v in out.aux.items()}
            micro.append(Micro(loss.detach(), out.aux_loss.detach(), aux, out.stats, out.ffn_rows, part))
        return micro

    def local(self, batch: Batch) -> Batch:
        return batch.map(lambda t: self.par.local_batch(t)[0].to(self.device))

    def skip_step(self, step: int, loss: torch.Tensor, params: list, norms: list) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        bad = [names.get(id(p), "?") for p, norm in zip(params, norms) if not torch.isfinite(norm)]
        where = f" (first non-finite gradient in {bad[0]})" if bad else ""
        self.log(f"step {step + 1}: non-finite loss {loss.item():.4g} or gradient{where}; update skipped")
        self.state.skipped_total += 1
        self.state.skipped_in_a_row += 1
        if self.state.skipped_in_a_row >= self.cfg.train.max_skipped_steps:
            raise TrainingError(
                f"{self.state.skipped_in_a_row} non-finite steps in a row (train.max_skipped_steps = "
                f"{self.cfg.train.max_skipped_steps}) at step {step + 1}: lower train.lr, use fp32, or check "
                "the data; the last good checkpoint is kept"
            )

    def step_scalars(self, total_loss, grad_norm, out, local: Batch) -> tuple[bool, float]:
        """(loss and gradient finite, training FLOPs executed by this rank's forward + backward)."""
        finite, rows, routed = host_scalars(total_loss, grad_norm, out, self.model.spawned, self.device)
        dense = self.task.forward_dense_flops(local)
        return finite, step_flops(dense, rows, routed, self.cfg.model, self.cfg.moe.num_experts)

    # ------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The task's metrics on its validation set, plus the phase, experts per token and counters; with
        ``eval.router = "train"`` the training selection's, and beside them the deterministic top-1's
        (suffixed ``_top1``)."""
        step = max(self.state.step - 1, 0)
        train_selection = self.cfg.eval.router == "train"
        metrics, per_token = self.eval_pass(step, train_selection)
        if train_selection:
            top1, _ = self.eval_pass(step, False)
            metrics.update({f"{k}_top1": v for k, v in top1.items()})
        return {
            "step": self.state.step,
            "phase": self.schedules.phases.phase(step),
            **metrics,
            "experts_per_token": per_token,
            "flops": self.state.flops,
            "tokens": self.state.tokens,
            "passes": self.task.passes(self.state.tokens),
        }

    def eval_pass(self, step: int, train_selection: bool) -> tuple[dict, float]:
        """(the task's metrics, experts per token) of one pass over the validation set. Leaves the RNG as it
        found it (evaluation draws nothing the training run would see)."""
        saved_rng = rng_state()
        self.model.eval()
        if train_selection:  # the same draws at every evaluation, whatever the training RNG holds
            torch.manual_seed(self.cfg.train.seed + 7919)
        routed = [0.0, 0.0]  # sum over batches of (mean experts/token over MoE layers) * tokens, tokens
        gate = self.gate_state(step, train_selection)

        def forward(batch: Batch):
            local = self.local(batch)
            with self.mode.autocast():
                out = self.eval_fwd(**local.inputs, gate=gate)
            if out.stats:
                tokens = sum(float(s.tokens) for s in out.stats) / len(out.stats)
                per_token = [float(s.pairs) / max(float(s.tokens), 1.0) for s in out.stats]
                routed[0] += sum(per_token) / len(per_token) * tokens
                routed[1] += tokens
            return out, local

        main = self.par.is_main
        out_dir = self.out if main else None
        ctx = EvalContext(
            forward, self.par.sum_floats, self.model, gate, self.device, self.state.step, out_dir, main
        )
        try:
            metrics = self.task.evaluate(ctx)
        finally:
            self.model.train()
            set_rng_state(saved_rng)
        pairs, tokens = self.par.sum_floats(routed)
        return metrics, pairs / tokens if tokens else 1.0

    # ------------------------------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.stop_requested = signal.Signals(signum).name

    def run(self) -> dict:
        from .progress import TrainProgress  # noqa: PLC0415 - rich is only needed for interactive runs

        t = self.cfg.train
        if self.par.is_main:
            metrics, evals = JsonlWriter(self.out / "metrics.jsonl"), JsonlWriter(self.out / "eval.jsonl")
        else:  # every rank computes; rank 0 writes
            metrics, evals = NullWriter(), NullWriter()
        board = open_sink(self.cfg.train.tensorboard and self.par.is_main, self.out / "tensorboard")
        interval, last = self.interval, None
        bar = TrainProgress(t.steps, self.state.step, enabled=self.show_progress)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with bar, self.mode.running():
                interval_seconds, interval_tokens = 0.0, 0
                for step in range(self.state.step, t.steps):
                    if self.budget_spent():  # a resumed run whose budget was already spent
                        break
                    tic = time.perf_counter()
                    tokens_before = self.state.tokens
                    self.train_step(step, interval)
                    dt = time.perf_counter() - tic
                    self.mode.after_step(step, dt)
                    self.state.train_seconds += dt
                    interval_seconds += dt
                    interval_tokens += self.state.tokens - tokens_before
                    self.state.step = done = step + 1
                    end = done == t.steps or self.budget_spent()
                    if done % t.log_every == 0 or end:
                        comm = self.par.reduce_interval(interval, self.model.spawned)  # all ranks' statistics
                        row = self.log_row(step, interval, interval_tokens / max(interval_seconds, 1e-9))
                        row.update(comm)
                        metrics.write(row)
                        board.write(row)
                        bar.update(done, row)
                        interval.reset()
                        interval_seconds, interval_tokens = 0.0, 0
                    if done % t.eval_every == 0 or end:
                        last = self.evaluate()
                        evals.write(last)
                        board.write_eval(last)
                        bar.note(f"step {done}: val_loss {last['val_loss']:.4f}  ppl {last['val_ppl']:.2f}")
                    # with several ranks, the stop request agreed at this step (a signal may reach one rank)
                    stop = self.par.agreed_stop(self.stop_requested)
                    if done % t.ckpt_every == 0 or end or stop:
                        self.save()
                    if stop:
                        self.stop_requested = stop
                        self.log(f"{stop}: checkpoint saved at step {done}; resume with --resume")
                        break
                    if end:
                        break
        finally:
            metrics.close()
            evals.close()
            board.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return {"stopped": self.stop_requested, "step": self.state.step, "eval": last}

    def log_row(self, step: int, interval: IntervalStats, tokens_per_s: float) -> dict:
        gate = self.step_gate
        row = {
            "step": step + 1,
            "phase": self.schedules.phases.phase(step),
            "lr": self.step_lr,
            "temperature": gate.tau if self.model.spawned else None,
            "hard": gate.hard,
        }
        row.update(interval.row())
        row.update(expert_diversity_row(self.model))
        row.update(
            tokens_per_s=tokens_per_s,
            flops=self.state.flops,
            tokens=self.state.tokens,
            passes=self.task.passes(self.state.tokens),
            skipped_steps=self.state.skipped_total,
            train_seconds=self.state.train_seconds,
        )
        return row


def resumable_checkpoint(out_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    return ckpt.find_good_checkpoint(out_dir / "checkpoints", log)


def env_default() -> Mapping[str, str]:
    return os.environ
