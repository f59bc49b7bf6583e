"""Export an evomoe model as a Hugging Face directory that transformers loads with no custom code, choosing
the class that computes exactly what evomoe evaluates.

Decoders (``AutoModelForCausalLM``). Dense models go to their own family: ``gpt2`` style -> GPT-2; ``llama``
style -> Llama (biases on all of q/k/v/o or none), or Qwen2 (biases on q/k/v only). MoE models (``llama``
style, swiglu experts) go by how the router's evaluation weights are formed (read from transformers'
modeling files):
- Mixtral always renormalises the top-k probabilities and has an MoE FFN in every layer: it takes a
  renormalised top-k (k >= 2) with ``moe_every = 1`` and no q/k/v biases;
- Qwen2-MoE has ``norm_topk_prob`` (renormalise or not), ``decoder_sparse_step`` (= ``moe_every``: dense
  MLPs between MoE layers) and ``qkv_bias``; it always has a sigmoid-gated shared expert, given width 1 and
  zero weights (it adds exactly 0). It takes everything else, in particular DTS / Switch top-1, whose
  weight is the un-renormalised softmax probability of the argmax expert (Mixtral would make it 1).
- Qwen3-MoE and OLMoE normalise queries and keys (q_norm / k_norm), which evomoe's attention does not.
GPT-2 blocks with MoE FFNs, evomoe's ungated shared experts and routers that are not a softmax top-k of a
linear gate (hash, BASE, StableMoE, capacity dropping, a DTS gate still in its soft phase) have no class.
A model imported with ``model.init_from`` keeps its source's special token ids and context (``source``).

Masked LMs (Megatron-BERT) and translation models (Blenderbot), dense ones only: ``export_encoder.py``.
``ExportError`` says why a model has no class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import source_special_ids
from .export_encoder import encdec_plan, masked_lm_plan
from .plan import ExportError, ExportPlan
from .weights import gpt2_to_hf, llama_to_hf
from .write import write_export

__all__ = ["ExportError", "ExportPlan", "plan_export", "write_export"]

GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


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
    )  # the source model's ids replace these (``with_source``)


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


def moe_plan(cfg, sd: dict[str, torch.Tensor], layers: list, routing: tuple[int, bool]) -> ExportPlan:
    if cfg.style != "llama" or cfg.activation != "swiglu":
        raise ExportError(
            f"model.style = {cfg.style!r}, activation = {cfg.activation!r}: transformers' MoE classes are "
            "llama-style decoders with swiglu experts; an MoE grown from GPT-2 has no class "
            "(`evomoe generate` runs it)"
        )
    if cfg.out_bias or cfg.mlp_bias:
        raise ExportError("model.out_bias / model.mlp_bias: transformers' MoE classes have no such biases")
    if layers[0].ffn.shared is not None:
        raise ExportError(
            f"moe.shared_experts = {layers[0].ffn.shared.num_experts}: evomoe adds its shared experts "
            "ungated, Qwen2-MoE gates its one shared expert with a sigmoid (never exactly 1): no class fits"
        )
    k, renorm = routing
    E, width = layers[0].ffn.num_experts, layers[0].ffn.experts.d_ff
    config = _llama_config(cfg)
    moe_idx = [b.layer_idx for b in layers]
    hf_sd = llama_to_hf(sd, cfg, set(moe_idx))
    if renorm and cfg.moe_every == 1 and not cfg.qkv_bias and width == cfg.d_ff:
        config.update(
            num_local_experts=E, num_experts_per_tok=k, router_jitter_noise=0.0, sliding_window=None
        )
        return ExportPlan("mixtral", config, hf_sd)
    d = cfg.d_model
    for i in moe_idx:  # Qwen2-MoE's shared expert, width 1, all zeros: it adds exactly 0
        h = f"model.layers.{i}.mlp."
        hf_sd[h + "shared_expert.gate_proj.weight"] = torch.zeros(1, d)
        hf_sd[h + "shared_expert.up_proj.weight"] = torch.zeros(1, d)
        hf_sd[h + "shared_expert.down_proj.weight"] = torch.zeros(d, 1)
        hf_sd[h + "shared_expert_gate.weight"] = torch.zeros(1, d)
    config.update(
        moe_intermediate_size=width,
        shared_expert_intermediate_size=1,
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


def with_source(plan: ExportPlan, cfg, source: dict[str, Any] | None) -> ExportPlan:
    """The source model's bos/eos/pad ids (config.json, generation_config.json), and its context where
    positions are rotary (no table: the source's limit holds); a learned table has ``seq_len`` rows."""
    plan.config.update(source_special_ids(source))
    plan.generation = source_special_ids(source, generation=True)
    theirs = (source or {}).get("config", {})
    their_max = theirs.get("max_position_embeddings") or theirs.get("n_positions")
    if "n_positions" in plan.config:
        was = f"; the source model had {their_max}" if their_max and their_max != cfg.seq_len else ""
        plan.notes.append(
            f"n_positions = {cfg.seq_len} (model.seq_len): the position table holds the run's "
            f"{cfg.seq_len} positions{was}"
        )
    elif their_max and their_max >= cfg.seq_len:
        plan.config["max_position_embeddings"] = their_max
        plan.notes.append(
            f"max_position_embeddings = {their_max}: the source model's context (rotary positions); this "
            f"run trained on {cfg.seq_len}-token windows (model.seq_len = {cfg.seq_len})"
        )
    else:
        plan.notes.append(
            f"max_position_embeddings = {cfg.seq_len} (model.seq_len): the longest context the model "
            "trained on"
        )
    return plan


def decoder_plan(model: nn.Module, hard: bool, source: dict[str, Any] | None = None) -> ExportPlan:
    """Which causal-LM class and weights reproduce ``model`` (an evomoe decoder)."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if not model.spawned:
        return with_source(dense_plan(cfg, sd), cfg, source)
    layers = [b for b in model.blocks if b.is_moe]
    try:
        routings = {b.ffn.router.export_routing(hard) for b in layers}
    except ValueError as e:
        router = type(layers[0].ffn.router)
        raise ExportError(
            f"router.name = {getattr(router, 'registered_name', router.__name__)!r}: {e}"
        ) from None
    if len(routings) != 1:  # pragma: no cover - one router config per model
        raise ExportError(f"MoE layers route differently ({routings})")
    return with_source(moe_plan(cfg, sd, layers, routings.pop()), cfg, source)


PLANS = {"decoder": decoder_plan, "encoder": masked_lm_plan, "encdec": encdec_plan}  # by the model's kind


def plan_export(
    model: nn.Module, hard: bool, source: dict[str, Any] | None = None, tokenizer: Any = None
) -> ExportPlan:
    """Which transformers class and weights reproduce ``model``; ExportError when none does. ``hard``: the
    gate's one-way hard flag at the checkpoint; ``source``: ``source_model(model.init_from)`` of an imported
    model; ``tokenizer``: the run's, whose special tokens (``bos_id``, ``eos_id``, ``pad_id``, ``mask_id``:
    masked LM, translation) the export names."""
    kind = getattr(model, "kind", "decoder")
    if kind not in PLANS:
        raise ExportError(f"a '{kind}' model has no export (models that have: {', '.join(PLANS)})")
    plan = PLANS[kind](model, hard, source)
    for role in ("bos", "eos", "pad", "mask"):  # the run's own special tokens
        if hasattr(tokenizer, f"{role}_id"):
            plan.special_tokens[f"{role}_token"] = i = getattr(tokenizer, f"{role}_id")
            if role != "mask":
                plan.config[f"{role}_token_id"] = i
    if plan.auto_class == "AutoModelForSeq2SeqLM" and "bos_token_id" in plan.config:
        plan.config["decoder_start_token_id"] = plan.config["bos_token_id"]  # the decoder reads <s> first
    for role in ("bos_token", "eos_token", "pad_token"):
        i = plan.config.get(f"{role}_id")
        if isinstance(i, int) and role not in plan.special_tokens:
            plan.special_tokens[role] = i
    return plan
