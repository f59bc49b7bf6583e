"""Routing statistics for every router: experts per token, chunk-level sparsity, load CV, dead experts."""

from __future__ import annotations

import math

import torch

from evomoe.moe.layer import routing_stats
from evomoe.moe.router import Routing
from evomoe.moe.stats import chunk_empty_slots, chunk_sparsity_reference, dead_experts, load_cv
from evomoe.train.metrics import IntervalStats


def random_routing(T: int, E: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, E, generator=g) > 0.7
    t, e = mask.nonzero(as_tuple=True)
    return Routing(t, e, torch.ones(t.numel()))


def test_chunk_sparsity_matches_the_loop_twin():
    for seed, shape in [(0, (2, 16)), (1, (3, 10)), (2, (1, 5))]:
        T = shape[0] * shape[1]
        r = random_routing(T, 6, seed)
        empty, slots = chunk_empty_slots(r.token_idx_P, r.expert_idx_P, T, 6, shape)
        want = chunk_sparsity_reference(r.token_idx_P, r.expert_idx_P, shape, 6)
        assert math.isclose(int(empty) / int(slots), want)


def test_chunks_never_span_two_sequences():
    # token 7 (end of sequence 0) uses expert 0, token 8 (start of sequence 1) expert 1: with S = 8 and
    # 8-token chunks they fall in different chunks, so each chunk uses one expert of 2
    r = Routing(torch.tensor([7, 8]), torch.tensor([0, 1]), torch.ones(2))
    empty, slots = chunk_empty_slots(r.token_idx_P, r.expert_idx_P, 16, 2, (2, 8))
    assert (int(empty), int(slots)) == (2, 4)


def test_load_cv_and_dead_experts():
    assert load_cv(torch.tensor([5.0, 5.0, 5.0])) == 0.0
    assert math.isclose(load_cv(torch.tensor([2.0, 0.0])), 1.0)
    assert dead_experts(torch.tensor([3, 0, 1, 0])) == 2


def test_interval_rows_give_per_layer_k_mean_std_max():
    T, E = 32, 4
    stats = []
    for seed in (0, 1):
        r = random_routing(T, E, seed)
        counts = torch.bincount(r.expert_idx_P, minlength=E)
        stats.append(routing_stats(r, counts, T, None, (4, 8), E))
    iv = IntervalStats()
    iv.add(torch.tensor(1.0), {}, stats, torch.tensor(0.0))
    iv.add(torch.tensor(1.0), {}, stats, torch.tensor(0.0))
    row = iv.row()
    k0 = torch.bincount(random_routing(T, E, 0).token_idx_P, minlength=T).double()
    layers = row["layers"]
    assert math.isclose(layers["k_mean"][0], k0.mean().item(), abs_tol=1e-4)
    assert math.isclose(layers["k_std"][0], k0.std(unbiased=False).item(), abs_tol=1e-4)
    assert layers["k_max"][0] == k0.max().item()
    assert len(layers["chunk_sparsity"]) == 2 and 0 <= row["chunk_sparsity"] <= 1
    again = IntervalStats()
    again.load_state_dict(iv.state_dict())
    assert again.row() == row
