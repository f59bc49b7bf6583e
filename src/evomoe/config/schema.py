"""The config schema: one dataclass per concern. The ``router`` and ``task`` sections are assembled from
the registered plug-ins: each plug-in class's ``Options`` dataclass becomes the sub-table of its name
(``[router.dts]``, ``[task.mt]``), so a config holds the settings of every method and ``name`` picks one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import ROUTERS, TASKS, Registry

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
SCHEMA_VERSION = 2  # bump with a migration in versions.py whenever a field is renamed or removed

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
STYLES = ("gpt2", "llama")
EXPERT_IMPLS = ("auto", "loop", "grouped", "padded", "fused", "fused_grouped")
GATE_INITS = ("auto", "zeros", "normal")
SPAWN_MODES = ("copy", "mask", "reinit", "split")
GATE_CLOCKS = ("steps", "flops")
EVAL_ROUTERS = ("top1", "train")
OPTIMIZER_IMPLS = ("foreach", "fused")
OPT_STATE_MODES = ("fresh", "copy")
DECAYS = ("linear", "exponential", "cosine")
TOKENIZERS = ("bpe", "bytes")
DATA_ORDERS = ("random", "shuffled")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DP_SHARDS = ("ddp", "fsdp")


@dataclass
class ModelConfig:
    name: str = "auto"  # a registered model (decoder, ...); auto: the task's default model
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
class MoEConfig:
    num_experts: int = 8
    experts_impl: str = "auto"  # auto | loop | grouped | padded | fused | fused_grouped
    enabled: bool = True  # false: the dense baseline (every block a dense FFN of width d_ff)
    shared_experts: int = 0  # always-on experts of width d_ff beside the routed ones (from the spawn on)
    expert_width: float = 1.0  # routed expert hidden width, times d_ff (fine-grained experts: < 1)
    shared_width: float = 1.0  # each shared expert's hidden width, times d_ff (< 1: fresh experts only)


@dataclass
class EvolveConfig:
    diversify_steps: int = 100  # phase 1 length; 0 starts sparse with freshly initialised experts
    spawn: str = "copy"  # copy | mask | reinit | split (a function-keeping mask, see evolve.py)
    ratio: float = 0.5  # share of hidden neurons masked / re-drawn per expert (mask, reinit, split)
    noise: float = 0.0  # copy: relative std of Gaussian noise added to each copy
    zero_sum_noise: bool = False  # copy noise on the output weights only, centred over the experts
    keep_one: bool = True  # mask/reinit: expert 0 keeps the unmodified base weights
    opt_state: str = "fresh"  # fresh | copy: optimizer moments of the spawned experts
    # fine-grained experts (moe.expert_width < 1) from the dense FFN: none keeps each expert's block of
    # hidden units as is; mean scales each unit's output row by E / (experts holding it), so that the
    # experts' mean is the dense FFN (a normalised gate over every expert computes it at the spawn)
    narrow_scale: str = "none"


@dataclass
class GateConfig:
    """Dense-to-sparse temperature schedule, counted from the spawn step (routers with a soft phase)."""

    tau_max: float = 2.0
    tau_min: float = 0.5
    decay: str = "linear"  # linear | exponential | cosine
    decay_steps: int = 500
    hard_after: int = 600  # steps after the spawn at which a dense-to-sparse gate becomes hard (one way)
    # steps: decay_steps / hard_after count steps after the spawn; flops: the decay ends when the executed
    # FLOPs reach decay_until * train.max_flops and the gate turns hard at hard_at * train.max_flops (without
    # a FLOPs budget: at those shares of train.steps, so one method file serves both kinds of budget)
    clock: str = "steps"
    decay_until: float = 0.5
    hard_at: float = 0.6


@dataclass
class DataConfig:
    # stdlib | pypackages | pypackages-xl, or a path to a file or a directory of files (text, or JSONL /
    # Parquet records: see text_field)
    corpus: str = "stdlib"
    include_tests: bool = False  # stdlib: also the interpreter's own test suite
    max_bytes: int = 0  # 0: the whole corpus; else keep files (in sorted order) up to this many bytes
    tokenizer: str = "bpe"  # bpe | bytes
    vocab_size: int = 4096  # bpe only
    val_fraction: float = 0.05  # share of files (by a hash of their path) held out for validation
    cache_dir: str = ""  # "": $EVOMOE_CACHE or ~/.cache/evomoe
    extensions: str = ".py,.txt,.md,.rst"  # directory corpora: which files to read (.jsonl, .parquet too)
    text_field: str = "text"  # JSONL / Parquet records: the field that holds the text
    dedup: bool = False  # drop exact duplicate documents (the first in corpus order stays); pypackages: on
    shard_bytes: int = 32 << 20  # text per token shard (shards are tokenized in parallel)
    workers: int = 0  # processes that scan and tokenize; 0: one per CPU core
    # random: each step draws independent random windows (they may repeat within a pass); shuffled: each
    # pass over the training split visits every window once, in a seeded order (no repeats within a pass)
    order: str = "random"


@dataclass
class TrainConfig:
    steps: int = 1000  # a cap on optimizer steps (with max_flops: the budget usually ends the run first)
    max_flops: float = 0.0  # training FLOPs budget: stop once this many were executed; 0: none
    batch_size: int = 16
    # micro-batches per optimizer step: the step's rows in this many blocks, one forward + backward each
    # (less memory; gradients of the mean loss; balance = "global" counts the whole step)
    accum_steps: int = 1
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
    compile: bool | str = False  # true | false | "auto": on where it is faster (train/compile.py)
    tensorboard: bool = False  # also write the metrics as TensorBoard events under RUN/tensorboard
    optimizer_impl: str = "foreach"  # foreach | fused (AdamW(fused=True): one kernel per step)
    expert_lr_scale: float = 1.0  # the routed experts' learning rate / train.lr (once spawned)


@dataclass
class EvalConfig:
    # top1: the deterministic top-1 of the clean gate (spec); train: the router's training selection at
    # the current schedule values (DTS: the tempered Gumbel threshold / cap), drawn from a fixed seed
    router: str = "top1"


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel group size (torchrun)
    dp_shard: str = "ddp"  # ddp | fsdp


@dataclass
class NoOptions:
    """A plug-in without settings of its own."""


_SECTION_CLASSES: dict[tuple, type] = {}


def plugin_section(title: str, registry: Registry, default: str, shared: list[tuple]) -> type:
    """A dataclass for a plug-in section: ``name``, the ``shared`` fields, and one sub-table per plug-in
    with ``Options`` (built once per set of registered plug-ins)."""
    tables = [(n, cls.Options) for n, cls in registry.items() if getattr(cls, "Options", None)]
    key = (title, tuple(tables))
    if key not in _SECTION_CLASSES:
        fields = [("name", str, field(default=default)), *shared]
        fields += [(n, opts, field(default_factory=opts)) for n, opts in tables]
        cls = dataclasses.make_dataclass(title, fields)
        cls.__module__ = __name__
        cls.__doc__ = f"The [{title.lower().removesuffix('config')}] section: name + one table per plug-in."
        # a user's own plug-ins (EVOMOE_PLUGINS): their tables are written only when selected, so a run
        # started with a plug-in loaded still reads back without it
        cls.external_tables = frozenset(
            n
            for n, c in registry.items()
            if getattr(c, "Options", None) and not c.__module__.startswith("evomoe.")
        )
        _SECTION_CLASSES[key] = cls
    return _SECTION_CLASSES[key]


def router_section() -> Any:
    shared = [("gate_init", str, field(default="auto"))]  # auto: each router's own default
    return plugin_section("RouterConfig", ROUTERS, "dts", shared)()


def router_config(**fields: Any) -> Any:
    """A ``[router]`` section with defaults, some fields set (for code that builds routers by hand)."""
    section = router_section()
    for k, v in fields.items():
        setattr(section, k, v)
    return section


def task_section() -> Any:
    return plugin_section("TaskConfig", TASKS, "lm", [])()


@dataclass
class Config:
    schema: int = SCHEMA_VERSION  # the version of this layout (config.toml, checkpoints)
    task: Any = field(default_factory=task_section)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    router: Any = field(default_factory=router_section)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def is_moe_block(layer: int, model: ModelConfig) -> bool:
    return (layer + 1) % model.moe_every == 0
