"""Greedy and beam search over step functions: cached greedy equals greedy by full re-decoding, a beam
wide enough to keep every hypothesis equals exhaustive search, beam 1 equals greedy, and beam 4 never
scores below greedy under the same length penalty."""

from __future__ import annotations

import itertools

import pytest
import torch

from evomoe.models.decoding import (
    beam_search,
    exhaustive_search,
    greedy_search,
    normalized,
    translate_batch,
)
from evomoe.models.encdec import EncoderDecoder
from evomoe.moe.router import GateState

from .seq_helpers import V, padded, spawn, tiny_cfg

BOS, EOS = V - 2, V - 1
GATE = GateState(tau=0.5, hard=True, step=50)


def toy_model(spawned: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_cfg("dts", 4)
    model = EncoderDecoder(cfg.model, cfg.moe)
    if spawned:
        spawn(model, cfg)
    return model.eval()


def source(seed=0):
    g = torch.Generator().manual_seed(seed)
    return padded(torch.randint(1, V - 2, (3, 7), generator=g), [7, 4, 2])


def full_redecode_step(model, src, src_valid):
    """Slow reference step: re-run the whole model on the prefix, no cache."""

    def step(tokens, state):
        prefix = tokens[:, None] if state is None else torch.cat([state, tokens[:, None]], 1)
        out = model(src, prefix, src_valid, gate=GATE)
        return torch.log_softmax(out.logits[:, -1].float(), -1), prefix

    return step


@torch.no_grad()
def test_cached_greedy_equals_full_redecoding():
    model = toy_model()
    src, valid = source()
    state = model.start_decoding(src, valid, GATE)
    fast = greedy_search(model.decode_step, state, 3, BOS, EOS, max_len=10)
    slow = greedy_search(full_redecode_step(model, src, valid), None, 3, BOS, EOS, max_len=10)
    assert fast == slow and all(len(s) <= 10 for s in fast)


def seq_score(step, state, seq, alpha, ended, bos=BOS, eos=EOS):
    """Length-normalized score of one hypothesis under the step function."""
    total, tokens = 0.0, [bos] + seq + ([eos] if ended else [])
    for prev, nxt in zip(tokens[:-1], tokens[1:]):
        logp, state = step(torch.tensor([prev]), state)
        total += float(logp[0, nxt])
    return normalized(total, len(tokens) - 1, alpha)


class ToyLM:
    """A fixed random bigram model over a tiny vocabulary (3 words + </s>): exhaustive search is cheap."""

    def __init__(self, vocab=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(vocab + 1, vocab, generator=g) * 2, -1)
        self.vocab, self.bos, self.eos = vocab, vocab, vocab - 1

    def step(self, tokens, state):
        return self.table[tokens], state

    @staticmethod
    def reorder(state, index):
        return state


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_equals_exhaustive(seed, alpha):
    lm = ToyLM(seed=seed)
    max_len = 4
    best_score, best = exhaustive_search(lm.step, lambda: None, lm.vocab, lm.bos, lm.eos, max_len, alpha)
    wide = beam_search(lm.step, lm.reorder, None, 1, lm.bos, lm.eos, max_len, beam=64, alpha=alpha)[0]
    assert wide == best
    narrow = beam_search(lm.step, lm.reorder, None, 1, lm.bos, lm.eos, max_len, beam=4, alpha=alpha)[0]
    ended = lambda s: len(s) < max_len  # noqa: E731
    assert seq_score(lm.step, None, narrow, alpha, ended(narrow), lm.bos, lm.eos) <= best_score + 1e-6


@torch.no_grad()
def test_beam_one_equals_greedy_and_beam_four_scores_at_least_greedy():
    model = toy_model()
    src, valid = source(1)
    greedy = greedy_search(model.decode_step, model.start_decoding(src, valid, GATE), 3, BOS, EOS, 8)
    one = beam_search(
        model.decode_step, model.reorder_state, model.start_decoding(src, valid, GATE, repeat=1), 3, BOS, EOS,
        8, beam=1, alpha=0.0,
    )  # fmt: skip
    assert one == greedy
    four = beam_search(
        model.decode_step, model.reorder_state, model.start_decoding(src, valid, GATE, repeat=4), 3, BOS, EOS,
        8, beam=4, alpha=1.0,
    )  # fmt: skip
    for b in range(3):
        step = full_redecode_step(model, src[b : b + 1], valid[b : b + 1])
        g_score = seq_score(step, None, greedy[b], 1.0, len(greedy[b]) < 8)
        f_score = seq_score(step, None, four[b], 1.0, len(four[b]) < 8)
        assert f_score >= g_score - 1e-5 or len(four[b]) == 8


def brute_force_best(table: torch.Tensor, max_len: int, alpha: float) -> tuple[float, list[int]]:
    """The reference, scored on its own (nothing shared with decoding.py): every sentence of the bigram
    model ``table`` [V + 1, V] (row V = <s>, token V - 1 = </s>): w_1 .. w_L </s> with L < max_len, scored
    sum log p / (L + 1) ** alpha, or max_len words left open, scored sum log p / max_len ** alpha."""
    vocab = table.shape[1]
    bos, eos, words = vocab, vocab - 1, range(vocab - 1)
    best = (float("-inf"), [])
    for n in range(max_len + 1):
        for seq in itertools.product(words, repeat=n):
            path = [bos, *seq] + ([eos] if n < max_len else [])
            total = sum(float(table[a, b]) for a, b in zip(path[:-1], path[1:]))
            score = total / (len(path) - 1) ** alpha
            if score > best[0]:
                best = (score, list(seq))
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_wide_beam_equals_brute_force_where_width_and_length_penalty_matter(alpha):
    """Over 60 random bigram models (3 words + </s>, 4 steps), a beam wide enough for every hypothesis
    (64 >= 3^3 open beams) finds the brute-force best. The fixtures are checked to include models where
    greedy decoding misses it (the beam's width matters) and where the length penalty changes it."""
    width_matters = penalty_matters = 0
    for seed in range(60):
        lm = ToyLM(seed=seed)
        score, best = brute_force_best(lm.table, 4, alpha)
        wide = beam_search(lm.step, lm.reorder, None, 1, lm.bos, lm.eos, 4, beam=64, alpha=alpha)[0]
        assert wide == best, (seed, wide, best, score)
        greedy = greedy_search(lm.step, None, 1, lm.bos, lm.eos, 4)[0]
        width_matters += greedy != best
        penalty_matters += brute_force_best(lm.table, 4, 0.0 if alpha else 1.0)[1] != best
    assert width_matters >= 3 and penalty_matters >= 3, (width_matters, penalty_matters)


@pytest.mark.parametrize("beam", [1, 4])
@torch.no_grad()
def test_cached_memory_keys_values_equal_recomputing_them_every_step(beam):
    """The cross-attention keys/values of the encoder memory computed once per sentence (the default)
    give the same translations as recomputing them at every step (the reference), with padded sources,
    and the same next-token log-probabilities at every step of a beam search's reordered state."""
    model = toy_model()
    src, valid = source(2)
    fast = translate_batch(model, src, valid, GATE, BOS, EOS, 9, beam=beam, cache_memory=True)
    slow = translate_batch(model, src, valid, GATE, BOS, EOS, 9, beam=beam, cache_memory=False)
    assert fast == slow and any(len(s) > 1 for s in fast)
    states = [model.start_decoding(src, valid, GATE, repeat=beam, cache_memory=c) for c in (True, False)]
    assert states[0]["memory"] is None and states[1]["memory_kv"] is None
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(0, V - 2, (3 * beam,), generator=g)
        (lp_fast, states[0]), (lp_slow, states[1]) = (model.decode_step(tokens, s) for s in states)
        torch.testing.assert_close(lp_fast, lp_slow, rtol=1e-5, atol=1e-5)
        order = torch.randint(0, 3 * beam, (3 * beam,), generator=g)
        states = [model.reorder_state(s, order) for s in states]
