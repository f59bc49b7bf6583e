"""Start from a Hugging Face model directory (``model.init_from``): its shape, weights and tokenizer.

The model's shape comes from ``DIR/config.json`` (explicit contradictions are errors), the data pipeline
tokenizes the corpus with ``DIR/tokenizer.json`` (the token cache is keyed by that file's hash), and every
FFN starts as an MoE layer holding the pretrained MLP as its one expert.
"""

from __future__ import annotations

import dataclasses
import hashlib

from ..config import Config, ConfigError, DataConfig
from ..data.tokenizer import PretrainedTokenizer, Tokenizer
from ..models import GPT
from ..models.hf.config import CONFIG_FILE, resolve_model_config
from ..models.hf.load import check_tokenizer_fits, load_pretrained_weights, tokenizer_path


def resolve_pretrained(cfg: Config) -> None:
    """Fill ``cfg.model`` from ``model.init_from`` (idempotent; a no-op without it)."""
    if cfg.model.init_from:
        cfg.model = resolve_model_config(cfg.model)


def pretrained_tokenizer(cfg: Config) -> tuple[Tokenizer | None, DataConfig]:
    """The model's tokenizer and the data config naming it (None and ``cfg.data`` without init_from)."""
    directory = cfg.model.init_from
    if not directory:
        return None, cfg.data
    path = tokenizer_path(directory, cfg.model.vocab_size)
    try:
        tok = PretrainedTokenizer.from_file(path)
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    check_tokenizer_fits(path, tok.vocab_size, cfg.model.vocab_size, path.parent / CONFIG_FILE)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return tok, dataclasses.replace(cfg.data, tokenizer=f"pretrained:{digest}")


def build_model(cfg: Config) -> GPT:
    """The decoder of ``cfg``; with ``model.init_from``, holding the pretrained weights."""
    model = GPT(cfg.model, cfg.moe)
    if cfg.model.init_from:
        load_pretrained_weights(model, cfg.model.init_from)
    return model
