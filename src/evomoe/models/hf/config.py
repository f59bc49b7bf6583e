"""Hugging Face ``config.json`` <-> ``model.*`` fields, for the dense families evomoe imports and exports.

Read with the standard library only (no ``transformers``): the core must work without it. A field the user
set explicitly (differs from its default) that contradicts ``config.json`` is an error naming both values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ...config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
SOURCE_FILE = "source_model.json"  # in a run directory: ``source_model(model.init_from)``
FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
# fields that define the pretrained model: taken from config.json, an explicit contradiction is an error
SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "activation",
    "style",
    "norm_eps",
    "rope_theta",
    "qkv_bias",
    "out_bias",
    "mlp_bias",
    "tie_weights",
)


@dataclasses.dataclass
class HFModel:
    """What config.json says, in evomoe's terms. ``fields``: model.* name -> (value, config.json key)."""

    family: str
    fields: dict[str, tuple[Any, str]]
    max_positions: int
    path: Path


def read_config_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ConfigError(f"model.init_from = '{directory}': not a directory")
    if not path.is_file():
        raise ConfigError(
            f"model.init_from: '{path}' not found: expected a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer.json)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path}' is not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a JSON object")
    return data


def _need(data: dict, key: str, path: Path) -> Any:
    if data.get(key) is None:
        raise ConfigError(f"'{path}' has no '{key}'")
    return data[key]


def _rope_theta(data: dict, path: Path) -> float:
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"'{path}': rope type '{kind}' is not supported (only default rotary positions)")
    return float(params.get("rope_theta", data.get("rope_theta", 10000.0)))


def _llama_like(data: dict, family: str, path: Path) -> dict[str, tuple[Any, str]]:
    d, h = _need(data, "hidden_size", path), _need(data, "num_attention_heads", path)
    head_dim = data.get("head_dim") or d // h
    if head_dim * h != d:
        raise ConfigError(f"'{path}': head_dim = {head_dim} != hidden_size / num_attention_heads = {d // h}")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"'{path}': hidden_act = '{act}' is not supported for {family} (only silu)")
    window = data.get("sliding_window") if data.get("use_sliding_window", family == "mistral") else None
    attn_bias = bool(data.get("attention_bias", False))
    return {
        "vocab_size": (_need(data, "vocab_size", path), "vocab_size"),
        "d_model": (d, "hidden_size"),
        "n_layers": (_need(data, "num_hidden_layers", path), "num_hidden_layers"),
        "n_heads": (h, "num_attention_heads"),
        "n_kv_heads": (data.get("num_key_value_heads") or h, "num_key_value_heads"),
        "d_ff": (_need(data, "intermediate_size", path), "intermediate_size"),
        "activation": ("swiglu", "hidden_act"),
        "style": ("llama", "model_type"),
        "norm_eps": (float(data.get("rms_norm_eps", 1e-6)), "rms_norm_eps"),
        "rope_theta": (_rope_theta(data, path), "rope_parameters.rope_theta"),
        "qkv_bias": (family == "qwen2" or attn_bias, "attention_bias"),
        "out_bias": (family != "qwen2" and attn_bias, "attention_bias"),
        "mlp_bias": (bool(data.get("mlp_bias", False)), "mlp_bias"),
        "tie_weights": (bool(data.get("tie_word_embeddings", False)), "tie_word_embeddings"),
        "_window": (window, "sliding_window"),
    }


GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _gpt2(data: dict, path: Path) -> dict[str, tuple[Any, str]]:
    d = _need(data, "n_embd", path)
    act = data.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConfigError(f"'{path}': activation_function = '{act}' is not supported")
    if data.get("scale_attn_by_inverse_layer_idx") or data.get("scale_attn_weights") is False:
        raise ConfigError(f"'{path}': only GPT-2's standard attention scaling is supported")
    return {
        "vocab_size": (_need(data, "vocab_size", path), "vocab_size"),
        "d_model": (d, "n_embd"),
        "n_layers": (_need(data, "n_layer", path), "n_layer"),
        "n_heads": (_need(data, "n_head", path), "n_head"),
        "n_kv_heads": (_need(data, "n_head", path), "n_head"),
        "d_ff": (data.get("n_inner") or 4 * d, "n_inner"),
        "activation": (GPT2_ACTIVATIONS[act], "activation_function"),
        "style": ("gpt2", "model_type"),
        "norm_eps": (float(data.get("layer_norm_epsilon", 1e-5)), "layer_norm_epsilon"),
        "rope_theta": (ModelConfig.rope_theta, "-"),
        "qkv_bias": (True, "-"),
        "out_bias": (True, "-"),
        "mlp_bias": (True, "-"),
        "tie_weights": (bool(data.get("tie_word_embeddings", True)), "tie_word_embeddings"),
        "seq_len": (_need(data, "n_positions", path), "n_positions"),
    }


def read_hf_model(directory: str | Path) -> HFModel:
    """Parse ``DIR/config.json``; ConfigError naming the file for what evomoe cannot represent."""
    data = read_config_json(directory)
    path = Path(directory) / CONFIG_FILE
    family = data.get("model_type")
    if family not in FAMILIES:
        archs = data.get("architectures")
        raise ConfigError(
            f"'{path}': model_type = {family!r} ({archs}) is not supported "
            f"(choose from: {', '.join(FAMILIES)})"
        )
    fields = _gpt2(data, path) if family == "gpt2" else _llama_like(data, family, path)
    max_pos = int(data.get("max_position_embeddings") or data.get("n_positions") or 0)
    return HFModel(family, fields, max_pos, path)


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the shape of the model in ``cfg.init_from``; an explicit contradiction is an error."""
    hf = read_hf_model(cfg.init_from)
    defaults, out = ModelConfig(), dataclasses.replace(cfg)
    fields = dict(hf.fields)
    window, _ = fields.pop("_window", (None, ""))
    for name, (value, key) in fields.items():
        mine, default = getattr(cfg, name), getattr(defaults, name)
        if name == "n_kv_heads" and mine == 0:
            mine = default = value  # 0 means n_heads
        if mine != default and mine != value:
            raise ConfigError(
                f"model.{name} = {mine!r} contradicts {hf.path}: {key} = {value!r} (leave model.{name} "
                "unset to take it from the pretrained model)"
            )
        setattr(out, name, value)
    if hf.max_positions and out.seq_len > hf.max_positions and cfg.seq_len == defaults.seq_len:
        out.seq_len = hf.max_positions  # the default context does not fit: take the model's
    if hf.max_positions and out.seq_len > hf.max_positions:
        raise ConfigError(
            f"model.seq_len = {out.seq_len} exceeds {hf.path}: max_position_embeddings = {hf.max_positions}"
        )
    if window is not None and window < out.seq_len:
        raise ConfigError(
            f"{hf.path}: sliding_window = {window} < model.seq_len = {out.seq_len}: sliding-window attention "
            "is not supported; lower model.seq_len"
        )
    return out


SOURCE_KEYS = ("model_type", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
               "n_positions")  # fmt: skip


def source_model(directory: str | Path) -> dict[str, Any]:
    """What an export needs to know of the model a run started from (``model.init_from``): its special
    token ids and its context, from ``config.json`` and ``generation_config.json`` (transformers' generate
    reads the end-of-text ids from the latter). Saved in the run, so export does not need the directory."""
    config = read_config_json(directory)
    gen_path = Path(directory) / "generation_config.json"
    try:
        generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{gen_path}' is not a readable JSON file: {e}") from None
    pick = lambda d: {k: d[k] for k in SOURCE_KEYS if isinstance(d, dict) and d.get(k) is not None}  # noqa: E731
    return {"init_from": str(directory), "config": pick(config), "generation_config": pick(generation)}


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_special_ids(source: dict[str, Any] | None, generation: bool = False) -> dict[str, Any]:
    """The source model's bos/eos/pad ids as ``config.json`` gives them, or (``generation``) as transformers'
    generate reads them: ``generation_config.json`` first (its eos may be a list), then ``config.json``."""
    if not source:
        return {}
    cfg, gen = source.get("config", {}), source.get("generation_config", {}) if generation else {}
    out = {k: gen.get(k, cfg.get(k)) for k in SPECIAL_IDS}
    return {k: v for k, v in out.items() if v is not None}


def end_of_text_ids(source: dict[str, Any] | None) -> tuple[int, ...]:
    """The ids at which generation stops (none for a model without a source or an eos id)."""
    eos = source_special_ids(source, generation=True).get("eos_token_id")
    return () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)


def family_of(directory: str | Path) -> str:
    return read_hf_model(directory).family
