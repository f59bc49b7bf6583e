"""RoBERTa dynamic masking: the vectorized recipe equals the token-by-token reference, its rates are
15% / 80-10-10, specials and padding are never masked, and a batch's masking depends only on (seed, step)."""

from __future__ import annotations

import torch

from evomoe.data.masking import IGNORE, apply_masking, apply_masking_reference, draw_masking, mask_batch

V, MASK = 50, 51


def batch(B: int = 6, S: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    maskable = torch.rand(B, S, generator=g) > 0.2
    return ids, maskable


def test_fast_equals_reference():
    ids, maskable = batch()
    draws = draw_masking(tuple(ids.shape), seed=3, step=7, num_normal=V)
    fast = apply_masking(ids, maskable, draws, MASK)
    slow = apply_masking_reference(ids, maskable, draws, MASK)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_rates_and_untouched_positions():
    ids, maskable = batch(B=64, S=256)
    inputs, targets = mask_batch(ids, maskable, seed=1, step=0, mask_id=MASK, num_normal=V)
    selected = targets != IGNORE
    assert not (selected & ~maskable).any()  # padding / specials never selected
    assert torch.equal(inputs[~selected], ids[~selected])
    rate = selected.sum() / maskable.sum()
    assert 0.14 < float(rate) < 0.16
    n = int(selected.sum())
    masked = int((inputs[selected] == MASK).sum())
    unchanged = int((inputs[selected] == ids[selected]).sum())
    assert 0.77 < masked / n < 0.83
    # unchanged: the 10% kept plus the random draws that hit the same id (1 / V of 10%)
    assert 0.08 < unchanged / n < 0.13
    assert torch.equal(targets[selected], ids[selected])


def test_pure_function_of_seed_and_step():
    ids, maskable = batch()
    a = mask_batch(ids, maskable, seed=5, step=11, mask_id=MASK, num_normal=V)
    b = mask_batch(ids, maskable, seed=5, step=11, mask_id=MASK, num_normal=V)
    c = mask_batch(ids, maskable, seed=5, step=12, mask_id=MASK, num_normal=V)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])  # re-drawn at the next step (dynamic masking)
