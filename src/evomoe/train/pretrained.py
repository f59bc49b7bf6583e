"""Start from a Hugging Face model directory (``model.init_from``): its shape and weights.

The model's shape comes from ``DIR/config.json`` (explicit contradictions are errors) and every FFN starts
as an MoE layer holding the pretrained MLP as its one expert. The LM task tokenizes the corpus with the
model's own ``DIR/tokenizer.json`` (``tasks.lm.model_tokenizer``).
"""

from __future__ import annotations

from ..config import Config, ConfigError
from ..models.hf.config import resolve_model_config
from ..models.hf.load import load_pretrained_weights

IMPORTABLE_MODELS = ("decoder",)  # the models whose parameters the Hugging Face adapters map


def resolve_pretrained(cfg: Config) -> None:
    """Fill ``cfg.model`` from ``model.init_from`` (idempotent; a no-op without it)."""
    if cfg.model.init_from:
        cfg.model = resolve_model_config(cfg.model)


def build_model(cfg: Config, cls: type):
    """``cls(cfg.model, cfg.moe)``; with ``model.init_from``, holding the pretrained weights."""
    model = cls(cfg.model, cfg.moe)
    if cfg.model.init_from:
        if getattr(cls, "kind", "") not in IMPORTABLE_MODELS:
            raise ConfigError(
                f"model.init_from: a {cls.__name__} cannot hold a Hugging Face decoder "
                f"(model.name must be one of: {', '.join(IMPORTABLE_MODELS)})"
            )
        load_pretrained_weights(model, cfg.model.init_from)
    return model
