"""State-dict adapters between evomoe's decoder and the Hugging Face dense families, plus reading a
directory's safetensors (one file or shards with an index) with errors that name the file.

evomoe layout: ``blocks.i.attn.qkv`` = [q; k; v] rows (heads major), ``blocks.i.ffn.experts.w1_EDH`` =
[E, D, H] with H = [gate | up] for swiglu, ``w2_EFD`` = [E, F, D]. HF Linear weights are [out, in]; GPT-2's
Conv1D weights are [in, out].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ...config import ConfigError, ModelConfig

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_safetensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of ``DIR`` (float32) and the file each came from; ConfigError naming a missing file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"'{index}' is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        bins = any(directory.glob("*.bin"))
        extra = " (only PyTorch .bin weights: convert them to safetensors)" if bins else ""
        raise ConfigError(f"'{directory}' has no {WEIGHTS_FILE} or {INDEX_FILE}{extra}")
    tensors, source = {}, {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"weight shard '{path}' (listed in {INDEX_FILE}) is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key], source[key] = f.get_tensor(key).float(), str(path)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"cannot read weight file '{path}': {e}") from None
    for key, name in (weight_map or {}).items():
        if key not in tensors:
            raise ConfigError(f"'{directory / name}' lacks tensor '{key}' that {INDEX_FILE} places there")
    return tensors, source


class _Reader:
    """Pops HF tensors by name; a missing one is an error naming the directory's weight files."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str, prefixes: tuple[str, ...] = ("",)):
        self.tensors, self.where, self.prefixes = tensors, where, prefixes

    def __call__(self, name: str) -> torch.Tensor:
        for prefix in self.prefixes:
            if prefix + name in self.tensors:
                return self.tensors[prefix + name]
        raise ConfigError(f"{self.where}: tensor '{self.prefixes[0]}{name}' is missing")

    def has(self, name: str) -> bool:
        return any(p + name in self.tensors for p in self.prefixes)


def llama_from_hf(r: _Reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"tok_emb.weight": r("model.embed_tokens.weight"), "ln_f.weight": r("model.norm.weight")}
    if not cfg.tie_weights:
        sd["lm_head.weight"] = r("lm_head.weight")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        a, m = h + "self_attn.", h + "mlp."
        sd[o + "ln1.weight"] = r(h + "input_layernorm.weight")
        sd[o + "ln2.weight"] = r(h + "post_attention_layernorm.weight")
        sd[o + "attn.qkv.weight"] = torch.cat([r(a + f"{p}_proj.weight") for p in "qkv"])
        sd[o + "attn.proj.weight"] = r(a + "o_proj.weight")
        if cfg.qkv_bias:
            sd[o + "attn.qkv.bias"] = torch.cat([r(a + f"{p}_proj.bias") for p in "qkv"])
        if cfg.out_bias:
            sd[o + "attn.proj.bias"] = r(a + "o_proj.bias")
        w1 = torch.cat([r(m + "gate_proj.weight").t(), r(m + "up_proj.weight").t()], dim=1)
        sd[o + "ffn.experts.w1_EDH"] = w1.unsqueeze(0)
        sd[o + "ffn.experts.w2_EFD"] = r(m + "down_proj.weight").t().unsqueeze(0)
        if cfg.mlp_bias:
            sd[o + "ffn.experts.b1_EH"] = torch.cat([r(m + "gate_proj.bias"), r(m + "up_proj.bias")])[None]
            sd[o + "ffn.experts.b2_ED"] = r(m + "down_proj.bias").unsqueeze(0)
    return sd


def gpt2_from_hf(r: _Reader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {
        "tok_emb.weight": r("wte.weight"),
        "pos_emb.weight": r("wpe.weight"),
        "ln_f.weight": r("ln_f.weight"),
        "ln_f.bias": r("ln_f.bias"),
    }
    if not cfg.tie_weights:
        sd["lm_head.weight"] = r("lm_head.weight")
    for i in range(cfg.n_layers):
        h, o = f"h.{i}.", f"blocks.{i}."
        for mine, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for kind in ("weight", "bias"):
                sd[o + f"{mine}.{kind}"] = r(h + f"{theirs}.{kind}")
        sd[o + "attn.qkv.weight"] = r(h + "attn.c_attn.weight").t()  # Conv1D: [in, out]
        sd[o + "attn.qkv.bias"] = r(h + "attn.c_attn.bias")
        sd[o + "attn.proj.weight"] = r(h + "attn.c_proj.weight").t()
        sd[o + "attn.proj.bias"] = r(h + "attn.c_proj.bias")
        sd[o + "ffn.experts.w1_EDH"] = r(h + "mlp.c_fc.weight").unsqueeze(0)  # [D, F] is already [in, out]
        sd[o + "ffn.experts.b1_EH"] = r(h + "mlp.c_fc.bias").unsqueeze(0)
        sd[o + "ffn.experts.w2_EFD"] = r(h + "mlp.c_proj.weight").unsqueeze(0)
        sd[o + "ffn.experts.b2_ED"] = r(h + "mlp.c_proj.bias").unsqueeze(0)
    return sd


def state_dict_from_hf(
    family: str, tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str
) -> dict[str, torch.Tensor]:
    """evomoe state dict (dense: one expert per FFN) from a dense HF family's tensors."""
    if family == "gpt2":
        return gpt2_from_hf(_Reader(tensors, where, ("transformer.", "")), cfg)
    return llama_from_hf(_Reader(tensors, where), cfg)


# ---------------------------------------------------------------------------------------------- export


def llama_to_hf(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, moe_layers: set[int]
) -> dict[str, torch.Tensor]:
    """HF names of the Llama / Qwen2 / Mixtral / Qwen2-MoE families (in memory, as ``state_dict()``).

    Blocks in ``moe_layers`` hold E experts and a gate: written as ``mlp.gate`` and ``mlp.experts`` with
    3-D ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]."""
    d, kv = cfg.d_model, (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["ln_f.weight"]}
    out["lm_head.weight"] = sd.get("lm_head.weight", sd["tok_emb.weight"])
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        out[h + "input_layernorm.weight"] = sd[o + "ln1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[o + "ln2.weight"]
        for p, part in zip("qkv", sd[o + "attn.qkv.weight"].split([d, kv, kv])):
            out[h + f"self_attn.{p}_proj.weight"] = part
        if o + "attn.qkv.bias" in sd:
            for p, part in zip("qkv", sd[o + "attn.qkv.bias"].split([d, kv, kv])):
                out[h + f"self_attn.{p}_proj.bias"] = part
        out[h + "self_attn.o_proj.weight"] = sd[o + "attn.proj.weight"]
        if o + "attn.proj.bias" in sd:
            out[h + "self_attn.o_proj.bias"] = sd[o + "attn.proj.bias"]
        w1, w2 = sd[o + "ffn.experts.w1_EDH"], sd[o + "ffn.experts.w2_EFD"]
        if i in moe_layers:
            out[h + "mlp.gate.weight"] = sd[o + "ffn.router.gate.weight"]
            out[h + "mlp.experts.gate_up_proj"] = w1.transpose(1, 2).contiguous()
            out[h + "mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
            continue
        gate, up = w1[0].t().chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = w2[0].t()
        if o + "ffn.experts.b1_EH" in sd:
            gate_b, up_b = sd[o + "ffn.experts.b1_EH"][0].chunk(2)
            out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = gate_b, up_b
            out[h + "mlp.down_proj.bias"] = sd[o + "ffn.experts.b2_ED"][0]
    return {k: v.contiguous() for k, v in out.items()}


def gpt2_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's names; absent biases (a native model without them) are written as zeros."""
    t = "transformer."
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    d, f = cfg.d_model, cfg.d_ff
    out = {
        t + "wte.weight": sd["tok_emb.weight"],
        t + "wpe.weight": sd["pos_emb.weight"],
        t + "ln_f.weight": sd["ln_f.weight"],
        t + "ln_f.bias": sd["ln_f.bias"],
        "lm_head.weight": sd.get("lm_head.weight", sd["tok_emb.weight"]),
    }
    for i in range(cfg.n_layers):
        h, o = f"{t}h.{i}.", f"blocks.{i}."
        for mine, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for kind in ("weight", "bias"):
                out[h + f"{theirs}.{kind}"] = sd[o + f"{mine}.{kind}"]
        out[h + "attn.c_attn.weight"] = sd[o + "attn.qkv.weight"].t()
        out[h + "attn.c_attn.bias"] = sd.get(o + "attn.qkv.bias", zeros(3 * d))
        out[h + "attn.c_proj.weight"] = sd[o + "attn.proj.weight"].t()
        out[h + "attn.c_proj.bias"] = sd.get(o + "attn.proj.bias", zeros(d))
        out[h + "mlp.c_fc.weight"] = sd[o + "ffn.experts.w1_EDH"][0]
        out[h + "mlp.c_fc.bias"] = sd.get(o + "ffn.experts.b1_EH", zeros((1, f)))[0]
        out[h + "mlp.c_proj.weight"] = sd[o + "ffn.experts.w2_EFD"][0]
        out[h + "mlp.c_proj.bias"] = sd.get(o + "ffn.experts.b2_ED", zeros((1, d)))[0]
    return {k: v.contiguous() for k, v in out.items()}
