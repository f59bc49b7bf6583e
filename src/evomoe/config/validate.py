"""Validation: every field checked before any work starts; errors name the field and the bad value.

Core sections are checked here, one function each; every plug-in's own table is checked by its
``Options.validate(cfg, prefix)``. Allowed values come from one list each (schema.py, the registries).
"""

from __future__ import annotations

import math
from typing import Any

from ..registry import MODELS, ROUTERS, TASKS
from . import schema as s
from .errors import check, choice


def _model(cfg: Any) -> None:
    m = cfg.model
    for name in ("d_model", "n_layers", "n_heads", "seq_len", "d_ff", "moe_every"):
        check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
    check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "must be >= 0 (0: from the tokenizer)")
    check(m.d_model % m.n_heads == 0, "model.d_model", m.d_model, f"must be divisible by n_heads={m.n_heads}")
    choice("model.activation", m.activation, s.ACTIVATIONS)
    choice("model.style", m.style, s.STYLES)
    check(0 < m.norm_eps < 1, "model.norm_eps", m.norm_eps, "must be in (0, 1)")
    check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    kv = m.n_kv_heads or m.n_heads
    check(m.n_kv_heads >= 0 and m.n_heads % kv == 0, "model.n_kv_heads", m.n_kv_heads, "must divide n_heads")
    check(
        m.style == "gpt2" or (m.d_model // m.n_heads) % 2 == 0,
        "model.d_model",
        m.d_model,
        "rotary positions need an even head width (d_model / n_heads)",
    )
    check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    check(
        m.moe_every <= m.n_layers,
        "model.moe_every",
        m.moe_every,
        f"must be <= n_layers={m.n_layers} so that at least one block is an MoE block",
    )


def _task_and_model(cfg: Any) -> None:
    choice("task.name", cfg.task.name, TASKS.names())
    choice("model.name", cfg.model.name, ["auto", *MODELS.names()])
    task = TASKS.get(cfg.task.name)
    if cfg.model.name != "auto":
        kind = MODELS.get(cfg.model.name).kind
        check(
            kind in task.model_kinds,
            "model.name",
            cfg.model.name,
            f"is a {kind} model; task.name = {cfg.task.name!r} trains {' or '.join(task.model_kinds)} models",
        )


def _moe_and_router(cfg: Any) -> None:
    check(cfg.moe.num_experts >= 1, "moe.num_experts", cfg.moe.num_experts, "must be >= 1")
    choice("moe.experts_impl", cfg.moe.experts_impl, s.EXPERT_IMPLS)
    m = cfg.moe
    check(m.shared_experts >= 0, "moe.shared_experts", m.shared_experts, "must be >= 0")
    for name in ("expert_width", "shared_width"):
        w, field_name = getattr(m, name), f"moe.{name}"
        check(0.0 < w < math.inf, field_name, w, "must be finite and > 0")
        check(
            round(w * cfg.model.d_ff) >= 1,
            field_name,
            w,
            f"must give >= 1 hidden unit of d_ff={cfg.model.d_ff}",
        )
    check(
        m.expert_width <= 1.0 or cfg.evolve.diversify_steps == 0,
        "moe.expert_width",
        m.expert_width,
        "must be <= 1 when experts are spawned from the dense FFN (evolve.diversify_steps > 0)",
    )
    check(
        m.shared_width == 1.0 or cfg.evolve.diversify_steps == 0 or m.shared_experts == 0,
        "moe.shared_width",
        m.shared_width,
        "must be 1 when the shared experts are spawned as copies of the dense FFN (evolve.diversify_steps > "
        "0); other widths start fresh (evolve.diversify_steps = 0)",
    )
    choice("router.name", cfg.router.name, ROUTERS.names())
    choice("router.gate_init", cfg.router.gate_init, s.GATE_INITS)


def _evolve_and_gate(cfg: Any) -> None:
    e, g, t = cfg.evolve, cfg.gate, cfg.train
    check(e.diversify_steps >= 0, "evolve.diversify_steps", e.diversify_steps, "must be >= 0")
    check(
        e.diversify_steps < t.steps or not cfg.moe.enabled,
        "evolve.diversify_steps",
        e.diversify_steps,
        f"must be < train.steps={t.steps}, or the run never spawns experts",
    )
    choice("evolve.spawn", e.spawn, s.SPAWN_MODES)
    check(0.0 <= e.ratio < 1.0, "evolve.ratio", e.ratio, "must be in [0, 1)")
    check(0.0 <= e.noise < math.inf, "evolve.noise", e.noise, "must be finite and >= 0")
    choice("evolve.opt_state", e.opt_state, s.OPT_STATE_MODES)
    check(
        e.opt_state != "copy" or cfg.moe.expert_width == 1.0 or e.diversify_steps == 0,
        "evolve.opt_state",
        e.opt_state,
        f"'copy' needs full-width experts: with moe.expert_width = {cfg.moe.expert_width} the spawned "
        "experts hold a subset of the dense FFN's units and its moments do not fit them; use 'fresh'",
    )
    choice("evolve.narrow_scale", e.narrow_scale, ("none", "mean"))
    check(g.tau_max > 0 and math.isfinite(g.tau_max), "gate.tau_max", g.tau_max, "must be > 0")
    check(0 < g.tau_min <= g.tau_max, "gate.tau_min", g.tau_min, f"must be in (0, tau_max={g.tau_max}]")
    choice("gate.decay", g.decay, s.DECAYS)
    check(
        g.decay_steps >= 1,
        "gate.decay_steps",
        g.decay_steps,
        "must be >= 1 (the reference code's 1 is a bug)",
    )
    check(g.hard_after >= 0, "gate.hard_after", g.hard_after, "must be >= 0")
    _flops_clock(cfg)


def _flops_clock(cfg: Any) -> None:
    g = cfg.gate
    choice("gate.clock", g.clock, s.GATE_CLOCKS)
    if g.clock != "flops":
        return
    check(0.0 < g.decay_until <= 1.0, "gate.decay_until", g.decay_until, "must be in (0, 1]")
    check(
        g.decay_until <= g.hard_at <= 1.0,
        "gate.hard_at",
        g.hard_at,
        f"must be in [decay_until={g.decay_until}, 1]",
    )


def _data(cfg: Any) -> None:
    d = cfg.data
    check(bool(d.corpus), "data.corpus", d.corpus, "must be 'stdlib' or a path")
    choice("data.tokenizer", d.tokenizer, s.TOKENIZERS)
    check(257 <= d.vocab_size <= 65535, "data.vocab_size", d.vocab_size, "must be in [257, 65535]")
    check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    check(d.max_bytes >= 0, "data.max_bytes", d.max_bytes, "must be >= 0 (0: no limit)")
    check(bool(d.text_field), "data.text_field", d.text_field, "name the record field that holds the text")
    check(d.shard_bytes >= 1024, "data.shard_bytes", d.shard_bytes, "must be >= 1024")
    check(d.workers >= 0, "data.workers", d.workers, "must be >= 0 (0: one per CPU core)")
    choice("data.order", d.order, s.DATA_ORDERS)


def _train(cfg: Any) -> None:
    t = cfg.train
    for name in (
        "steps",
        "batch_size",
        "log_every",
        "eval_every",
        "eval_batches",
        "ckpt_every",
        "keep_checkpoints",
        "accum_steps",
    ):
        check(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "must be >= 1")
    check(
        t.batch_size % t.accum_steps == 0,
        "train.accum_steps",
        t.accum_steps,
        f"must divide train.batch_size = {t.batch_size} (micro-batches of equal rows)",
    )
    check(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be > 0")
    check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    check(0.0 <= t.weight_decay < math.inf, "train.weight_decay", t.weight_decay, "must be finite and >= 0")
    check(0 <= t.beta1 < 1, "train.beta1", t.beta1, "must be in [0, 1)")
    check(0 <= t.beta2 < 1, "train.beta2", t.beta2, "must be in [0, 1)")
    check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0: no clipping)")
    choice("train.precision", t.precision, s.PRECISIONS)
    check(
        isinstance(t.compile, bool) or t.compile == "auto",
        "train.compile",
        t.compile,
        "must be true, false or 'auto' (on where it is faster)",
    )
    choice("train.device", t.device, s.DEVICES)
    check(t.threads >= 0, "train.threads", t.threads, "must be >= 0")
    check(t.max_skipped_steps >= 1, "train.max_skipped_steps", t.max_skipped_steps, "must be >= 1")
    check(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    budget_ok = 0.0 <= t.max_flops < math.inf
    check(budget_ok, "train.max_flops", t.max_flops, "must be finite and >= 0 (0: no budget)")
    choice("train.optimizer_impl", t.optimizer_impl, s.OPTIMIZER_IMPLS)
    ok = 0.0 < t.expert_lr_scale < math.inf
    check(ok, "train.expert_lr_scale", t.expert_lr_scale, "must be finite and > 0")


def _eval(cfg: Any) -> None:
    choice("eval.router", cfg.eval.router, s.EVAL_ROUTERS)
    if cfg.eval.router == "train" and cfg.moe.enabled:
        check(
            ROUTERS.get(cfg.router.name).dense_to_sparse,
            "eval.router",
            cfg.eval.router,
            f"needs a dense-to-sparse router (router.name = {cfg.router.name!r} routes the same way in "
            "training and evaluation)",
        )


def _parallel(cfg: Any) -> None:
    p = cfg.parallel
    check(p.ep >= 1, "parallel.ep", p.ep, "must be >= 1")
    check(
        cfg.moe.num_experts % p.ep == 0,
        "parallel.ep",
        p.ep,
        f"must divide moe.num_experts={cfg.moe.num_experts}",
    )
    choice("parallel.dp_shard", p.dp_shard, s.DP_SHARDS)


def _plugin_tables(cfg: Any) -> None:
    """Each plug-in's ``Options.validate(cfg, prefix)`` checks its own table (``router.topk.k``, ...)."""
    for section, registry in (("router", ROUTERS), ("task", TASKS)):
        for name in registry.names():
            opts = getattr(getattr(cfg, section), name, None)
            if opts is not None and hasattr(opts, "validate"):
                opts.validate(cfg, f"{section}.{name}")


def validate(cfg: Any) -> None:
    parts = (_model, _task_and_model, _moe_and_router, _evolve_and_gate, _data, _train, _eval, _parallel)
    for part in parts:
        part(cfg)
    _plugin_tables(cfg)


def finite_nonneg(prefix: str, opts: Any, names: tuple[str, ...]) -> None:
    """Shared check for plug-in options: weights and coefficients must be finite and >= 0."""
    for name in names:
        value = getattr(opts, name)
        check(0.0 <= value < math.inf, f"{prefix}.{name}", value, "must be finite and >= 0")
