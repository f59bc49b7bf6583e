"""Tiny Hugging Face models of each family, built from a config (no download), with a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 300
WORDS = "def return import class self value print for while with lambda yield"


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE (all 256 bytes, then merges of a few words; at most ``vocab_size`` ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([WORDS] * 20, trainer=trainer)
    return tok


def hf_config(family: str, **kw):
    import transformers as tf

    common = dict(vocab_size=VOCAB, tie_word_embeddings=kw.pop("tie", False))
    specials = {k: kw.pop(k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **specials, **common, **kw)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        **specials,
        **common,
    )
    llama_like.update(kw)
    if family == "qwen2":
        return tf.Qwen2Config(rope_theta=1e6, **llama_like)
    if family == "mistral":
        return tf.MistralConfig(rope_theta=1e4, sliding_window=4096, **llama_like)
    return tf.LlamaConfig(rope_theta=5e4, **llama_like)


def save_tiny(family: str, directory: Path, seed: int = 0, **kw) -> Path:
    """A randomly initialised ``family`` model (biases and norms randomised too) saved in ``directory``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **kw)
    classes = {"gpt2": tf.GPT2LMHeadModel, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}
    model = classes.get(family, tf.LlamaForCausalLM)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def hf_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits
