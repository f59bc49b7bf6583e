"""Run configuration: one dataclass per concern, loaded from TOML, overridden with dotted CLI keys.

Every field is validated before any work starts; errors name the field (``train.lr``) and the value.
Router options live in one sub-table per router (``[router.dts]``, ``[router.topk]``, ...), so a
config can hold the settings of every method and ``router.name`` picks one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or impossible. The message names the field."""


PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    d_ff: int = 256  # hidden width of one expert (and of the dense FFN in non-MoE blocks)
    activation: str = "gelu"  # gelu | gelu_tanh | relu | swiglu
    moe_every: int = 1  # block i is an MoE block when (i + 1) % moe_every == 0
    tie_weights: bool = True
    dropout: float = 0.0
    # gpt2: LayerNorm + learned positions; llama: RMSNorm + rotary positions (pair with activation=swiglu)
    style: str = "gpt2"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama style only
    n_kv_heads: int = 0  # grouped-query attention: 0 = n_heads
    qkv_bias: bool = False
    out_bias: bool = False  # attention output projection
    mlp_bias: bool = False  # the FFN / every expert
    init_from: str = ""  # a local Hugging Face model directory: shape, weights and tokenizer come from it


@dataclass
class DTSConfig:
    threshold: float = 0.001
    combine: str = "clean"  # clean: softmax(z) masked; noisy: the tempered noisy weights y masked
    balance_weight: float = 0.0
    gumbel: bool = True


@dataclass
class TopKConfig:
    k: int = 1
    capacity_factor: float = 0.0  # 0 means dropless
    second_policy: str = "all"  # all | sampling | random (k == 2 only)
    renormalize: bool = True  # k >= 2: weights divided by their sum over the chosen experts
    aux_weight: float = 0.01
    z_loss_weight: float = 0.0


@dataclass
class BaseConfig:
    auction_eps: float = 0.0  # 0: chosen from the affinities' scale
    auction_iters: int = 200


@dataclass
class HashConfig:
    mode: str = "balanced"  # balanced | random
    seed: int = 0


@dataclass
class StableMoEConfig:
    stage1_fraction: float = 0.1  # share of the run's steps spent in stage 1
    embed_dim: int = 50
    balance_weight: float = 0.3
    distill_weight: float = 0.3


@dataclass
class RouterConfig:
    name: str = "dts"
    # auto: zeros for dts (uniform start; its Gumbel noise breaks ties), N(0, 0.02) for the others
    # (a zero gate would send every token of an argmax router to expert 0)
    gate_init: str = "auto"  # auto | zeros | normal
    dts: DTSConfig = field(default_factory=DTSConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    stablemoe: StableMoEConfig = field(default_factory=StableMoEConfig)


@dataclass
class MoEConfig:
    num_experts: int = 8
    experts_impl: str = "auto"  # auto | loop | grouped | padded | fused | fused_grouped
    enabled: bool = True  # false: the dense baseline (every block a dense FFN of width d_ff)


@dataclass
class EvolveConfig:
    diversify_steps: int = 100  # phase 1 length; 0 starts sparse with freshly initialised experts
    spawn: str = "copy"  # copy | mask | reinit
    ratio: float = 0.5  # share of hidden neurons masked / re-drawn per expert (mask, reinit)
    noise: float = 0.0  # copy: relative std of Gaussian noise added to each copy
    keep_one: bool = True  # mask/reinit: expert 0 keeps the unmodified base weights
    opt_state: str = "fresh"  # fresh | copy: optimizer moments of the spawned experts


@dataclass
class GateConfig:
    """Dense-to-sparse temperature schedule, counted from the spawn step."""

    tau_max: float = 2.0
    tau_min: float = 0.5
    decay: str = "linear"  # linear | exponential | cosine
    decay_steps: int = 500
    hard_after: int = 600  # steps after the spawn at which the DTS gate becomes hard top-1 (one way)


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # stdlib, or a path to a text file or a directory of text files
    include_tests: bool = False  # stdlib: also the interpreter's own test suite
    max_bytes: int = 0  # 0: the whole corpus; else keep files (in sorted order) up to this many bytes
    tokenizer: str = "bpe"  # bpe | bytes
    vocab_size: int = 4096  # bpe only
    val_fraction: float = 0.05  # share of files (by a hash of their path) held out for validation
    cache_dir: str = ""  # "": $EVOMOE_CACHE or ~/.cache/evomoe
    extensions: str = ".py,.txt,.md,.rst"  # directory corpora: which files to read


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: torch's default
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops
    compile: bool = False
    tensorboard: bool = False  # also write the metrics as TensorBoard events under RUN/tensorboard


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel group size (torchrun)
    dp_shard: str = "ddp"  # ddp | fsdp


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ----------------------------------------------------------------------------------------------------
# loading and overriding


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(path: str, typ: Any, value: Any) -> Any:
    """Check a TOML or CLI value against a field's type; ints are accepted for floats."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used
        raise TypeError(f"unsupported field type {typ} for {path}")
    raise ConfigError(f"{path}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    types_ = _field_types(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in types_:
            choices = ", ".join(types_)
            raise ConfigError(f"unknown config key '{path}' = {value!r} (choose from: {choices})")
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a table, got {value!r}")
            _apply(getattr(obj, key), value, path + ".")
        else:
            setattr(obj, key, _coerce(path, typ, value))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.field=value`` (leading dashes allowed) -> (["section", "field"], parsed value)."""
    body = text.lstrip("-")
    if "=" not in body:
        raise ConfigError(f"override '{text}' must look like --section.field=value")
    key, raw = body.split("=", 1)
    keys = key.split(".")
    if not all(keys):
        raise ConfigError(f"override '{text}': empty key part")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --router.name=switch
    return keys, value


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {keys[-1]: value}
    for k in reversed(keys[:-1]):
        out = {k: out}
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str | None) -> Path | None:
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        return p
    preset = PRESET_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config '{name_or_path}' is neither a TOML file nor a preset (choose from: {', '.join(preset_names())})"
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file or preset, then the dotted overrides; validated."""
    cfg = Config()
    path = resolve_config_path(name_or_path)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{path}' is not UTF-8 text") from None
        _apply(cfg, data)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply(cfg, _nest(keys, value))
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted overrides to a config in place, validate, and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        _apply(cfg, _nest(keys, value))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    # control characters (but tab) may not appear raw in a TOML string: escape them
    s = "".join(f"\\u{ord(c):04x}" if (c < " " and c != "\t") or c == "\x7f" else c for c in s)
    return f'"{s}"'


def to_toml(cfg: Any) -> str:
    """Write a (nested) dataclass as TOML; tables in field order."""
    lines: list[str] = []

    def emit(obj: Any, name: str) -> None:
        scalars = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        plain = [(k, v) for k, v in scalars if not dataclasses.is_dataclass(v)]
        nested = [(k, v) for k, v in scalars if dataclasses.is_dataclass(v)]
        if name:
            lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in plain)
        lines.append("")
        for k, v in nested:
            emit(v, f"{name}.{k}" if name else k)

    emit(cfg, "")
    return "\n".join(lines).strip() + "\n"


# ----------------------------------------------------------------------------------------------------
# validation


def _check(cond: bool, field_: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{field_} = {value!r}: {why}")


def _choice(field_: str, value: str, choices: list[str]) -> None:
    _check(value in choices, field_, value, f"choose from: {', '.join(choices)}")


def validate(cfg: Config) -> None:
    from .registry import ROUTERS  # noqa: PLC0415 - registry imports routers lazily

    m, t, g, e, d = cfg.model, cfg.train, cfg.gate, cfg.evolve, cfg.data
    for name in ("d_model", "n_layers", "n_heads", "seq_len", "d_ff", "moe_every"):
        _check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
    _check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "must be >= 0 (0: from the tokenizer)")
    _check(
        m.d_model % m.n_heads == 0, "model.d_model", m.d_model, f"must be divisible by n_heads={m.n_heads}"
    )
    _choice("model.activation", m.activation, ["gelu", "gelu_tanh", "relu", "swiglu"])
    _choice("model.style", m.style, ["gpt2", "llama"])
    _check(0 < m.norm_eps < 1, "model.norm_eps", m.norm_eps, "must be in (0, 1)")
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    kv = m.n_kv_heads or m.n_heads
    _check(
        m.n_kv_heads >= 0 and m.n_heads % kv == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must divide n_heads={m.n_heads} (0: n_heads)",
    )
    _check(
        m.style == "gpt2" or (m.d_model // m.n_heads) % 2 == 0,
        "model.d_model",
        m.d_model,
        "rotary positions need an even head width (d_model / n_heads)",
    )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(cfg.moe.num_experts >= 1, "moe.num_experts", cfg.moe.num_experts, "must be >= 1")
    _choice(
        "moe.experts_impl",
        cfg.moe.experts_impl,
        ["auto", "loop", "grouped", "padded", "fused", "fused_grouped"],
    )
    _check(
        m.moe_every <= m.n_layers,
        "model.moe_every",
        m.moe_every,
        f"must be <= n_layers={m.n_layers} so that at least one block is an MoE block",
    )
    _choice("router.name", cfg.router.name, ROUTERS.names())
    _choice("router.gate_init", cfg.router.gate_init, ["auto", "zeros", "normal"])
    dts, tk = cfg.router.dts, cfg.router.topk
    _check(0.0 <= dts.threshold < 1.0, "router.dts.threshold", dts.threshold, "must be in [0, 1)")
    _choice("router.dts.combine", dts.combine, ["clean", "noisy"])
    _check(
        1 <= tk.k <= cfg.moe.num_experts,
        "router.topk.k",
        tk.k,
        f"must be in [1, num_experts={cfg.moe.num_experts}]",
    )
    _check(
        tk.capacity_factor >= 0.0,
        "router.topk.capacity_factor",
        tk.capacity_factor,
        "must be >= 0 (0: dropless)",
    )
    _choice("router.topk.second_policy", tk.second_policy, ["all", "sampling", "random"])
    _choice("router.hash.mode", cfg.router.hash.mode, ["balanced", "random"])
    sm = cfg.router.stablemoe
    _check(
        0.0 < sm.stage1_fraction < 1.0,
        "router.stablemoe.stage1_fraction",
        sm.stage1_fraction,
        "must be in (0, 1)",
    )
    _check(sm.embed_dim >= 1, "router.stablemoe.embed_dim", sm.embed_dim, "must be >= 1")
    _check(
        cfg.router.base.auction_iters >= 1, "router.base.auction_iters", cfg.router.base.auction_iters, ">= 1"
    )
    finite_nonneg = {
        "router.dts.balance_weight": dts.balance_weight,
        "router.topk.aux_weight": tk.aux_weight,
        "router.topk.z_loss_weight": tk.z_loss_weight,
        "router.stablemoe.balance_weight": sm.balance_weight,
        "router.stablemoe.distill_weight": sm.distill_weight,
        "router.base.auction_eps": cfg.router.base.auction_eps,
        "evolve.noise": cfg.evolve.noise,
        "train.weight_decay": cfg.train.weight_decay,
    }
    for name, value in finite_nonneg.items():
        _check(0.0 <= value < math.inf, name, value, "must be finite and >= 0")
    _check(cfg.train.seed >= 0, "train.seed", cfg.train.seed, "must be >= 0")

    _check(e.diversify_steps >= 0, "evolve.diversify_steps", e.diversify_steps, "must be >= 0")
    _check(
        e.diversify_steps < t.steps or not cfg.moe.enabled,
        "evolve.diversify_steps",
        e.diversify_steps,
        f"must be < train.steps={t.steps}, or the run never spawns experts",
    )
    _choice("evolve.spawn", e.spawn, ["copy", "mask", "reinit"])
    _check(0.0 <= e.ratio < 1.0, "evolve.ratio", e.ratio, "must be in [0, 1)")
    _check(e.noise >= 0.0, "evolve.noise", e.noise, "must be >= 0")
    _choice("evolve.opt_state", e.opt_state, ["fresh", "copy"])

    _check(g.tau_max > 0 and math.isfinite(g.tau_max), "gate.tau_max", g.tau_max, "must be > 0")
    _check(0 < g.tau_min <= g.tau_max, "gate.tau_min", g.tau_min, f"must be in (0, tau_max={g.tau_max}]")
    _choice("gate.decay", g.decay, ["linear", "exponential", "cosine"])
    _check(
        g.decay_steps >= 1,
        "gate.decay_steps",
        g.decay_steps,
        "must be >= 1 (the reference code's 1 is a bug)",
    )
    _check(g.hard_after >= 0, "gate.hard_after", g.hard_after, "must be >= 0")

    _check(bool(d.corpus), "data.corpus", d.corpus, "must be 'stdlib' or a path")
    _choice("data.tokenizer", d.tokenizer, ["bpe", "bytes"])
    _check(257 <= d.vocab_size <= 65535, "data.vocab_size", d.vocab_size, "must be in [257, 65535]")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(d.max_bytes >= 0, "data.max_bytes", d.max_bytes, "must be >= 0 (0: no limit)")

    for name in (
        "steps",
        "batch_size",
        "log_every",
        "eval_every",
        "eval_batches",
        "ckpt_every",
        "keep_checkpoints",
    ):
        _check(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "must be >= 1")
    _check(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be > 0")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _check(0 <= t.beta1 < 1, "train.beta1", t.beta1, "must be in [0, 1)")
    _check(0 <= t.beta2 < 1, "train.beta2", t.beta2, "must be in [0, 1)")
    _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0: no clipping)")
    _choice("train.precision", t.precision, ["fp32", "bf16"])
    _choice("train.device", t.device, ["auto", "cpu", "cuda"])
    _check(t.threads >= 0, "train.threads", t.threads, "must be >= 0")
    _check(t.max_skipped_steps >= 1, "train.max_skipped_steps", t.max_skipped_steps, "must be >= 1")

    _check(cfg.parallel.ep >= 1, "parallel.ep", cfg.parallel.ep, "must be >= 1")
    _check(
        cfg.moe.num_experts % cfg.parallel.ep == 0,
        "parallel.ep",
        cfg.parallel.ep,
        f"must divide moe.num_experts={cfg.moe.num_experts}",
    )
    _choice("parallel.dp_shard", cfg.parallel.dp_shard, ["ddp", "fsdp"])


def is_moe_block(layer: int, model: ModelConfig) -> bool:
    return (layer + 1) % model.moe_every == 0


__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "config_from_dict",
    "to_toml",
    "to_dict",
    "is_moe_block",
]
