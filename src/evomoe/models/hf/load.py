"""Import a local Hugging Face dense model (``model.init_from = DIR``) into evomoe's decoder.

Every FFN becomes an MoE layer holding the pretrained MLP as its one expert (phase 1 of EvoMoE); the
spawn then copies, masks or re-initialises it. Needs no ``transformers``: config.json and safetensors are
read directly, and every shape is checked against the model built from the config, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...config import ConfigError
from .config import read_hf_model
from .weights import read_safetensors, state_dict_from_hf

TOKENIZER_FILE = "tokenizer.json"


def load_pretrained_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy ``DIR``'s weights into ``model`` (built from the resolved ``model.*`` config, not spawned)."""
    hf = read_hf_model(directory)
    tensors, source = read_safetensors(directory)
    cfg = model.cfg
    where = f"'{directory}' (weights: {', '.join(sorted({Path(s).name for s in source.values()}))})"
    sd = state_dict_from_hf(hf.family, tensors, cfg, where)
    own = model.state_dict()
    for name, value in sd.items():
        if name not in own:
            raise ConfigError(f"{where}: no place for '{name}' in the evomoe model (is it already spawned?)")
        if tuple(own[name].shape) != tuple(value.shape):
            raise ConfigError(
                f"{where}: a tensor mapped to '{name}' has shape {tuple(value.shape)}, config.json implies "
                f"{tuple(own[name].shape)} (mismatched weight files?)"
            )
    missing = [n for n in own if n not in sd and not (cfg.tie_weights and n == "lm_head.weight")]
    if missing:
        raise ConfigError(f"{where}: no weights for {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, value in sd.items():
            own[name].copy_(value)


def tokenizer_path(directory: str | Path) -> Path:
    """``DIR/tokenizer.json``; ConfigError naming it when it is missing."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        hint = " (only a SentencePiece tokenizer.model: save it as tokenizer.json with a fast tokenizer)"
        raise ConfigError(f"'{path}' not found{hint if (directory / 'tokenizer.model').is_file() else ''}")
    return path


def check_tokenizer_fits(path: Path, tokenizer_vocab: int, vocab_size: int, config_path: Path) -> None:
    if tokenizer_vocab > vocab_size:
        raise ConfigError(
            f"tokenizer '{path}' has {tokenizer_vocab} tokens but the embedding in '{config_path}' has "
            f"vocab_size = {vocab_size} rows: the tokenizer does not belong to this model"
        )
