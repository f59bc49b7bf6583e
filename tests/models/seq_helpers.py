"""Tiny configs and models shared by the encoder / encoder-decoder tests."""

from __future__ import annotations

import torch

from evomoe.config import Config
from evomoe.evolve import spawn_model

V = 23


def tiny_cfg(router: str = "dts", experts: int = 4, moe_every: int = 1) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len = V, 16, 2, 2, 24
    m.d_ff, m.moe_every = 32, moe_every
    cfg.moe.num_experts = experts
    cfg.router.name = router
    return cfg


def spawn(model, cfg: Config, seed: int = 0) -> None:
    counts = torch.ones(cfg.model.vocab_size, dtype=torch.long)
    spawn_model(
        model, cfg, torch.Generator().manual_seed(seed), vocab_size=cfg.model.vocab_size, token_counts=counts
    )


def padded(ids_BS: torch.Tensor, lengths: list[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    valid = torch.arange(ids_BS.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return ids_BS.masked_fill(~valid, pad_id), valid
