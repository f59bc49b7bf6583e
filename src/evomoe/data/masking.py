"""RoBERTa dynamic masking for the masked LM: re-drawn every time a sequence is seen.

Of the maskable tokens (valid, not a special token) a fraction ``p`` is selected; of those, 80% become
``<mask>``, 10% a random text token, 10% stay unchanged. The draws come from ``np.random.default_rng([seed,
step, MASK_STREAM])``, so a batch's masking is a pure function of (seed, step): a resumed run masks
exactly as the uninterrupted one. Targets are the original ids at selected positions, -100 elsewhere.

Legend: B batch, S sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MASK_STREAM = 0x6D6C6D  # separates the masking draws from the batch-sampling draws of the same step
IGNORE = -100


@dataclass(frozen=True)
class MaskDraws:
    """The random numbers one batch's masking consumes (so that a slow reference can reuse them)."""

    select_BS: np.ndarray  # uniform [0, 1): selected when < p
    kind_BS: np.ndarray  # uniform [0, 1): < 0.8 mask, < 0.9 random token, else unchanged
    random_BS: np.ndarray  # int: the replacement token when the kind is "random"


def draw_masking(shape: tuple[int, int], seed: int, step: int, num_normal: int) -> MaskDraws:
    rng = np.random.default_rng([seed, step, MASK_STREAM])
    return MaskDraws(rng.random(shape), rng.random(shape), rng.integers(0, num_normal, size=shape))


def apply_masking(
    ids_BS: torch.Tensor,
    maskable_BS: torch.Tensor,
    draws: MaskDraws,
    mask_id: int,
    p: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BS, targets_BS): the masked inputs, and the original ids where selected (else -100)."""
    select = torch.from_numpy(draws.select_BS < p) & maskable_BS
    kind = torch.from_numpy(draws.kind_BS)
    to_mask = select & (kind < mask_frac)
    to_random = select & (kind >= mask_frac) & (kind < mask_frac + random_frac)
    inputs = ids_BS.masked_fill(to_mask, mask_id)
    inputs = torch.where(to_random, torch.from_numpy(draws.random_BS).to(ids_BS.dtype), inputs)
    targets = ids_BS.masked_fill(~select, IGNORE)
    return inputs, targets


def apply_masking_reference(
    ids_BS: torch.Tensor,
    maskable_BS: torch.Tensor,
    draws: MaskDraws,
    mask_id: int,
    p: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow twin of :func:`apply_masking`: one token at a time, the recipe as written."""
    inputs, targets = ids_BS.clone(), torch.full_like(ids_BS, IGNORE)
    B, S = ids_BS.shape
    for b in range(B):
        for s in range(S):
            if not bool(maskable_BS[b, s]) or not draws.select_BS[b, s] < p:
                continue
            targets[b, s] = ids_BS[b, s]
            u = draws.kind_BS[b, s]
            if u < mask_frac:
                inputs[b, s] = mask_id
            elif u < mask_frac + random_frac:
                inputs[b, s] = int(draws.random_BS[b, s])
    return inputs, targets


def mask_batch(
    ids_BS: torch.Tensor,
    maskable_BS: torch.Tensor,
    seed: int,
    step: int,
    mask_id: int,
    num_normal: int,
    p: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask one batch as a pure function of (seed, step); see :func:`apply_masking`."""
    draws = draw_masking(tuple(ids_BS.shape), seed, step, num_normal)
    return apply_masking(ids_BS, maskable_BS, draws, mask_id, p)
