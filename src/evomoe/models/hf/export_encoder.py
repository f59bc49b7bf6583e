"""Export of the masked LM and the translation model: which transformers class computes them, if any.

The masked LM (``models.encoder.MaskedLM``) is a pre-norm encoder without an embedding LayerNorm, learned
positions counted from 0, a final LayerNorm, and RoBERTa's head (dense, GELU, LayerNorm, the tied embedding
plus a bias). Read from transformers' modeling files (5.x): RoBERTa and BERT are post-norm; RoBERTa-PreLN
and XLM-RoBERTa-XL normalise the embeddings and count positions from ``pad_token_id + 1``; ESM scales
embeddings around ``<mask>``. Megatron-BERT computes exactly this (its token-type embedding is given one
zero row, which adds exactly 0), with one GELU and one LayerNorm epsilon for the whole model: a dense
masked LM exports to ``MegatronBertForMaskedLM`` when its activation is GELU and ``model.norm_eps`` is the
1e-5 of its head's LayerNorm. No transformers masked-LM class has MoE FFNs.

The translation model (``models.encdec.EncoderDecoder``) is pre-norm in both stacks, with learned positions
counted from 0 and no embedding LayerNorm, final LayerNorms, one tied embedding and no output bias:
Blenderbot (the large one, ``scale_embedding = False``) computes exactly this when dense (its two position
tables both get the shared one; its ``final_logits_bias`` stays 0; its LayerNorms have epsilon 1e-5). BART
and mBART normalise the embeddings and offset positions by 2; Marian, M2M100, NLLB-MoE and FSMT use
sinusoidal positions; T5 and Switch Transformers relative position biases: no transformers encoder-decoder
with MoE layers computes evomoe's. Legend: D width, H expert hidden width, F = H (no gate half).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .plan import ExportError, ExportPlan

MLM_LN_EPS = 1e-5  # the head's and the final LayerNorm's (nn.LayerNorm's default); Blenderbot's too
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def megatron_to_hf(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """``MegatronBertForMaskedLM``'s names for a dense ``MaskedLM``; absent biases are written as zeros."""
    d, b, e = cfg.d_model, "bert.", "bert.encoder."
    zeros = lambda *shape: torch.zeros(*shape)  # noqa: E731
    out = {
        b + "embeddings.word_embeddings.weight": sd["tok_emb.weight"],
        b + "embeddings.position_embeddings.weight": sd["pos_emb.weight"],
        b + "embeddings.token_type_embeddings.weight": zeros(1, d),
        e + "ln.weight": sd["encoder.ln_f.weight"],
        e + "ln.bias": sd["encoder.ln_f.bias"],
        "cls.predictions.transform.dense.weight": sd["head.dense.weight"],
        "cls.predictions.transform.dense.bias": sd["head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": sd["head.ln.weight"],
        "cls.predictions.transform.LayerNorm.bias": sd["head.ln.bias"],
        "cls.predictions.decoder.weight": sd["tok_emb.weight"],
        "cls.predictions.bias": sd["head.bias"],
        "cls.predictions.decoder.bias": sd["head.bias"],
    }
    for i in range(cfg.n_layers):
        h, o = f"{e}layer.{i}.", f"encoder.blocks.{i}."
        out[h + "attention.ln.weight"], out[h + "attention.ln.bias"] = (
            sd[o + "ln1.weight"],
            sd[o + "ln1.bias"],
        )
        out[h + "ln.weight"], out[h + "ln.bias"] = sd[o + "ln2.weight"], sd[o + "ln2.bias"]
        qkv_bias = sd.get(o + "attn.qkv.bias", zeros(3 * d))
        for p, w, bias in zip(
            ("query", "key", "value"), sd[o + "attn.qkv.weight"].split(d), qkv_bias.split(d)
        ):
            out[h + f"attention.self.{p}.weight"], out[h + f"attention.self.{p}.bias"] = w, bias
        out[h + "attention.output.dense.weight"] = sd[o + "attn.proj.weight"]
        out[h + "attention.output.dense.bias"] = sd.get(o + "attn.proj.bias", zeros(d))
        w1, w2 = sd[o + "ffn.experts.w1_EDH"][0], sd[o + "ffn.experts.w2_EFD"][0]  # [D, H], [F, D]
        out[h + "intermediate.dense.weight"] = w1.t()
        out[h + "intermediate.dense.bias"] = sd.get(o + "ffn.experts.b1_EH", zeros(1, w1.shape[1]))[0]
        out[h + "output.dense.weight"] = w2.t()
        out[h + "output.dense.bias"] = sd.get(o + "ffn.experts.b2_ED", zeros(1, d))[0]
    return {k: v.contiguous() for k, v in out.items()}


def masked_lm_plan(model: nn.Module, hard: bool, source: dict[str, Any] | None = None) -> ExportPlan:  # noqa: ARG001
    """``MegatronBertForMaskedLM`` for a dense masked LM; ExportError naming the field that has no class."""
    cfg = model.cfg
    if model.spawned:
        raise ExportError(
            "no transformers masked-LM class has MoE feed-forward layers; export a checkpoint taken before "
            "the spawn (evolve.diversify_steps), or a dense run (moe.enabled = false)"
        )
    checks = [
        (cfg.style == "gpt2", f"model.style = {cfg.style!r}: transformers' masked LMs use LayerNorm"),
        (
            cfg.activation == "gelu",
            f"model.activation = {cfg.activation!r}: Megatron-BERT (the one pre-norm masked LM without an "
            "embedding LayerNorm) uses one activation for the FFNs and the head, whose GELU is exact: 'gelu'",
        ),
        (
            cfg.norm_eps == MLM_LN_EPS,
            f"model.norm_eps = {cfg.norm_eps}: Megatron-BERT has one LayerNorm epsilon, and the masked LM's "
            f"head uses {MLM_LN_EPS}",
        ),
        (
            (cfg.n_kv_heads or cfg.n_heads) == cfg.n_heads,
            f"model.n_kv_heads = {cfg.n_kv_heads}: Megatron-BERT has no grouped-query attention",
        ),
    ]
    for ok, why in checks:
        if not ok:
            raise ExportError(why)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    config = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.seq_len,
        type_vocab_size=1,
        layer_norm_eps=MLM_LN_EPS,
        tie_word_embeddings=True,
    )
    note = f"max_position_embeddings = {cfg.seq_len} (model.seq_len): <s> + {cfg.seq_len - 1} text tokens"
    plan = ExportPlan("megatron-bert", config, megatron_to_hf(sd, cfg), "AutoModelForMaskedLM", [note])
    plan.bos_prefix = True
    return plan


def _attention(sd: dict, o: str, mine: str, d: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(q|k|v, weight, bias) of an evomoe attention: self-attention rows [q; k; v], cross ``q`` and [k; v]."""
    bias = lambda name, n: sd.get(o + f"{mine}.{name}.bias", torch.zeros(n))  # noqa: E731
    if mine == "attn":
        weights, biases = sd[o + "attn.qkv.weight"].split(d), bias("qkv", 3 * d).split(d)
    else:
        weights = (sd[o + "cross.q.weight"], *sd[o + "cross.kv.weight"].split(d))
        biases = (bias("q", d), *bias("kv", 2 * d).split(d))
    return list(zip("qkv", weights, biases))


def _blenderbot_layer(out: dict, sd: dict, h: str, o: str, d: int, cross: bool) -> None:
    attn = [("self_attn", "attn", "ln1")] + ([("encoder_attn", "cross", "ln_cross")] if cross else [])
    for theirs, mine, ln in attn:
        for p, w, b in _attention(sd, o, mine, d):
            out[h + f"{theirs}.{p}_proj.weight"], out[h + f"{theirs}.{p}_proj.bias"] = w, b
        out[h + f"{theirs}.out_proj.weight"] = sd[o + f"{mine}.proj.weight"]
        out[h + f"{theirs}.out_proj.bias"] = sd.get(o + f"{mine}.proj.bias", torch.zeros(d))
        out[h + f"{theirs}_layer_norm.weight"] = sd[o + f"{ln}.weight"]
        out[h + f"{theirs}_layer_norm.bias"] = sd[o + f"{ln}.bias"]
    w1, w2 = sd[o + "ffn.experts.w1_EDH"][0], sd[o + "ffn.experts.w2_EFD"][0]  # [D, H], [F, D]
    out[h + "fc1.weight"] = w1.t()
    out[h + "fc1.bias"] = sd.get(o + "ffn.experts.b1_EH", torch.zeros(1, w1.shape[1]))[0]
    out[h + "fc2.weight"] = w2.t()
    out[h + "fc2.bias"] = sd.get(o + "ffn.experts.b2_ED", torch.zeros(1, d))[0]
    out[h + "final_layer_norm.weight"] = sd[o + "ln2.weight"]
    out[h + "final_layer_norm.bias"] = sd[o + "ln2.bias"]


def blenderbot_to_hf(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """``BlenderbotForConditionalGeneration``'s names for a dense ``EncoderDecoder``."""
    d, m = cfg.d_model, "model."
    out = {m + "shared.weight": sd["tok_emb.weight"], "lm_head.weight": sd["tok_emb.weight"]}
    out["final_logits_bias"] = torch.zeros(1, cfg.vocab_size)
    for stack, ln in (("encoder", "encoder.ln_f"), ("decoder", "dec_ln")):
        e = f"{m}{stack}."
        out[e + "embed_tokens.weight"] = sd["tok_emb.weight"]
        out[e + "embed_positions.weight"] = sd["pos_emb.weight"]
        out[e + "layer_norm.weight"], out[e + "layer_norm.bias"] = sd[ln + ".weight"], sd[ln + ".bias"]
    for i in range(cfg.n_layers):
        _blenderbot_layer(out, sd, f"{m}encoder.layers.{i}.", f"encoder.blocks.{i}.", d, cross=False)
        _blenderbot_layer(out, sd, f"{m}decoder.layers.{i}.", f"dec_blocks.{i}.", d, cross=True)
    return {k: v.contiguous() for k, v in out.items()}


def encdec_plan(model: nn.Module, hard: bool, source: dict[str, Any] | None = None) -> ExportPlan:  # noqa: ARG001
    """``BlenderbotForConditionalGeneration`` for a dense translation model; ExportError otherwise."""
    cfg = model.cfg
    if model.spawned:
        raise ExportError(
            "no transformers encoder-decoder class with MoE feed-forward layers computes evomoe's "
            "translation model (NLLB-MoE: sinusoidal positions; Switch Transformers: relative position "
            "biases); `evomoe generate` translates with it; a checkpoint taken before the spawn exports"
        )
    checks = [
        (cfg.style == "gpt2", f"model.style = {cfg.style!r}: Blenderbot has LayerNorm, learned positions"),
        (cfg.activation in HF_ACT, f"model.activation = {cfg.activation!r}: Blenderbot has no gated FFN"),
        (cfg.norm_eps == MLM_LN_EPS, f"model.norm_eps = {cfg.norm_eps}: Blenderbot's LayerNorms use 1e-5"),
        (
            (cfg.n_kv_heads or cfg.n_heads) == cfg.n_heads,
            f"model.n_kv_heads = {cfg.n_kv_heads}: Blenderbot has no grouped-query attention",
        ),
    ]
    for ok, why in checks:
        if not ok:
            raise ExportError(f"translation model: {why}")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    L, H, F = cfg.n_layers, cfg.n_heads, cfg.d_ff
    config = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=L, decoder_layers=L,
        encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=F, decoder_ffn_dim=F,
        activation_function=HF_ACT[cfg.activation], max_position_embeddings=cfg.seq_len,
        scale_embedding=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        tie_word_embeddings=True, encoder_no_repeat_ngram_size=0, forced_eos_token_id=None,
    )  # fmt: skip
    note = f"max_position_embeddings = {cfg.seq_len} (model.seq_len): of the source and of the translation"
    return ExportPlan("blenderbot", config, blenderbot_to_hf(sd, cfg), "AutoModelForSeq2SeqLM", [note])
