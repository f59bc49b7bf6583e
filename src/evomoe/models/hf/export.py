"""Export an evomoe decoder as a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads
with no custom code, choosing the ``transformers`` class that computes exactly what evomoe evaluates.

Dense models go to their own family: ``gpt2`` style -> GPT-2; ``llama`` style -> Llama (biases on all of
q/k/v/o or none), or Qwen2 (biases on q/k/v only). MoE models (``llama`` style, swiglu experts) go by how
the router's evaluation weights are formed (read from transformers' modeling files):
- Mixtral always renormalises the top-k probabilities and has an MoE FFN in every layer: it takes a
  renormalised top-k (k >= 2) with ``moe_every = 1`` and no q/k/v biases;
- Qwen2-MoE has ``norm_topk_prob`` (renormalise or not), ``decoder_sparse_step`` (= ``moe_every``: dense
  MLPs between MoE layers) and ``qkv_bias``; its shared expert is given width 0 (it adds exactly 0). It
  takes everything else, in particular DTS / Switch top-1, whose weight is the un-renormalised softmax
  probability of the argmax expert (Mixtral would make it 1).
- Qwen3-MoE and OLMoE normalise queries and keys (q_norm / k_norm), which evomoe's attention does not.
GPT-2 blocks with MoE FFNs and routers that are not a softmax top-k of a linear gate (hash, BASE,
StableMoE, capacity dropping, a DTS gate still in its soft phase) have no class: ``ExportError`` says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .weights import gpt2_to_hf, llama_to_hf

GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


class ExportError(ValueError):
    """No transformers class computes this model; the message says why and what to do."""


@dataclass
class ExportPlan:
    model_type: str  # transformers' model_type: gpt2 | llama | qwen2 | mixtral | qwen2_moe
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]  # transformers' in-memory names


def _llama_config(cfg) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_weights,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _gpt2_plan(cfg, sd) -> ExportPlan:
    if cfg.activation not in GPT2_ACT:
        raise ExportError(f"model.activation = {cfg.activation!r}: GPT-2 MLPs use {', '.join(GPT2_ACT)}")
    if (cfg.n_kv_heads or cfg.n_heads) != cfg.n_heads:
        raise ExportError(f"model.n_kv_heads = {cfg.n_kv_heads}: GPT-2 has no grouped-query attention")
    config = dict(
        vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        n_positions=cfg.seq_len,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function=GPT2_ACT[cfg.activation],
        tie_word_embeddings=cfg.tie_weights,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return ExportPlan("gpt2", config, gpt2_to_hf(sd, cfg))


def dense_plan(cfg, sd: dict[str, torch.Tensor]) -> ExportPlan:
    if cfg.style == "gpt2":
        return _gpt2_plan(cfg, sd)
    if cfg.activation != "swiglu":
        raise ExportError(
            f"model.activation = {cfg.activation!r}: llama-style families have gated (swiglu) MLPs only"
        )
    config = _llama_config(cfg)
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias:
        return ExportPlan("qwen2", dict(config, use_sliding_window=False), llama_to_hf(sd, cfg, set()))
    if cfg.qkv_bias != cfg.out_bias:
        raise ExportError(
            f"model.qkv_bias = {cfg.qkv_bias} with model.out_bias = {cfg.out_bias}: Llama has biases on "
            "all of q/k/v/o or none, Qwen2 on q/k/v only (and no MLP biases)"
        )
    config.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return ExportPlan("llama", config, llama_to_hf(sd, cfg, set()))


def moe_plan(cfg, sd: dict[str, torch.Tensor], moe_idx: list[int], routing: tuple[int, bool], E: int):
    if cfg.style != "llama" or cfg.activation != "swiglu":
        raise ExportError(
            f"model.style = {cfg.style!r}, activation = {cfg.activation!r}: transformers' MoE classes are "
            "llama-style decoders with swiglu experts; an MoE grown from GPT-2 has no class "
            "(`evomoe generate` runs it)"
        )
    if cfg.out_bias or cfg.mlp_bias:
        raise ExportError("model.out_bias / model.mlp_bias: transformers' MoE classes have no such biases")
    k, renorm = routing
    config = _llama_config(cfg)
    hf_sd = llama_to_hf(sd, cfg, set(moe_idx))
    if renorm and cfg.moe_every == 1 and not cfg.qkv_bias:
        config.update(
            num_local_experts=E, num_experts_per_tok=k, router_jitter_noise=0.0, sliding_window=None
        )
        return ExportPlan("mixtral", config, hf_sd)
    d = cfg.d_model
    for i in moe_idx:
        h = f"model.layers.{i}.mlp."
        hf_sd[h + "shared_expert.gate_proj.weight"] = torch.zeros(0, d)
        hf_sd[h + "shared_expert.up_proj.weight"] = torch.zeros(0, d)
        hf_sd[h + "shared_expert.down_proj.weight"] = torch.zeros(d, 0)
        hf_sd[h + "shared_expert_gate.weight"] = torch.zeros(1, d)
    config.update(
        moe_intermediate_size=cfg.d_ff,
        shared_expert_intermediate_size=0,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=renorm,
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=[],
        qkv_bias=cfg.qkv_bias,
        use_sliding_window=False,
        router_aux_loss_coef=0.0,
    )
    return ExportPlan("qwen2_moe", config, hf_sd)


def plan_export(model: nn.Module, hard: bool) -> ExportPlan:
    """Which class and weights reproduce ``model`` (an evomoe decoder); ExportError when none does."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if not model.spawned:
        return dense_plan(cfg, sd)
    layers = [b for b in model.blocks if b.is_moe]
    try:
        routings = {b.ffn.router.export_routing(hard) for b in layers}
    except ValueError as e:
        raise ExportError(f"router.name = {type(layers[0].ffn.router).__name__}: {e}") from None
    if len(routings) != 1:  # pragma: no cover - one router config per model
        raise ExportError(f"MoE layers route differently ({routings})")
    return moe_plan(cfg, sd, [b.layer_idx for b in layers], routings.pop(), layers[0].ffn.num_experts)


def write_export(plan: ExportPlan, out: str | Path, tokenizer_json: str | None = None) -> Path:
    """Build the transformers model from the plan, load the weights strictly, ``save_pretrained``."""
    import transformers  # noqa: PLC0415 - only export needs it

    out = Path(out)
    config = transformers.AutoConfig.for_model(plan.model_type, **plan.config)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(plan.state_dict, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:  # pragma: no cover - the adapters and transformers disagree
        raise ExportError(f"{plan.model_type}: missing {missing[:5]}, unexpected {unexpected[:5]} weights")
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": plan_max_len(plan)}
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1) + "\n", encoding="utf-8")
    return out


def plan_max_len(plan: ExportPlan) -> int:
    return int(plan.config.get("max_position_embeddings") or plan.config.get("n_positions") or 0)
