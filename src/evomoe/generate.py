"""Text generation: sampling (temperature, top-k; temperature 0 = greedy) over a model's step function.

The fast path feeds the prompt once and then one token per step through a key-value cache; the
reference (``cache=False``) re-decodes the whole sequence every step. Both pick the same tokens.
Legend: B batch, S positions, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from .models.layers import KVCache


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_k: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids [B]: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature < 0:
        raise ValueError(f"--temperature = {temperature}: must be >= 0 (0: greedy)")
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    cache: bool = True,
) -> torch.Tensor:
    """``prompt_BS`` followed by ``max_new_tokens`` generated ids. ``model``: an evomoe decoder (eval mode,
    so routing is deterministic); positions must fit ``model.cfg.seq_len``."""
    limit = model.cfg.seq_len
    if prompt_BS.shape[1] < 1:
        raise ValueError("the prompt encodes to no tokens: give a longer --prompt")
    if prompt_BS.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_BS.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds "
            f"model.seq_len = {limit}"
        )
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=prompt_BS.device).manual_seed(seed)
    kv = KVCache.empty(len(model.blocks)) if cache else None
    seq_BS, feed_BS = prompt_BS, prompt_BS
    for _ in range(max_new_tokens):
        logits_BSV = model(feed_BS, cache=kv).logits if cache else model(seq_BS).logits
        next_B = sample_next(logits_BSV[:, -1], temperature, top_k, gen)
        seq_BS = torch.cat([seq_BS, next_B.unsqueeze(1)], dim=1)
        feed_BS = next_B.unsqueeze(1)
    model.train(was_training)
    return seq_BS
