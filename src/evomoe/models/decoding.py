"""Greedy and beam search as pure functions over a step function.

A step function maps (the tokens just emitted [N], a state) to (next-token log-probabilities [N, V], the
new state); ``reorder(state, index_N)`` keeps the given rows (beam search). Any model fits: the
encoder-decoder's cached ``decode_step``, or the slow full re-decoding used by the tests as reference.

Scores are summed log-probabilities; beam search ranks finished hypotheses by ``score / len ** alpha``
(the length penalty; len counts the tokens generated, ``</s>`` included). Hypotheses still open at
``max_len`` are finished there.
Legend: B sentences, K beams, V vocabulary, L generated length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
ReorderFn = Callable[[Any, torch.Tensor], Any]


def greedy_search(
    step: StepFn, state: Any, batch: int, bos: int, eos: int, max_len: int, all_steps: bool = False
) -> list[list[int]]:
    """The argmax token at every step until ``</s>`` (not included in the output) or ``max_len`` tokens.
    ``all_steps``: take all ``max_len`` steps even when every sentence has ended (keeps several processes
    whose steps are collectives in step)."""
    tokens = torch.full((batch,), bos, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(batch)]
    for _ in range(max_len):
        logp_BV, state = step(tokens, state)
        tokens = logp_BV.argmax(-1).cpu()
        for b in range(batch):
            if not done[b] and int(tokens[b]) != eos:
                out[b].append(int(tokens[b]))
        done |= tokens == eos
        if bool(done.all()) and not all_steps:
            break
    return out


def normalized(score: float, length: int, alpha: float) -> float:
    return score / max(length, 1) ** alpha


def _advance(
    top_val: list[float],
    top_idx: list[int],
    seqs: list[list[int]],
    b: int,
    K: int,
    V: int,
    eos: int,
    finished: list[tuple[float, list[int]]],
    alpha: float,
    last: bool,
) -> list[tuple[int, int, float, list[int]]]:
    """Sentence ``b``'s next K beams (row, token, score, sequence) from its best 2K candidates; the
    candidates ending in ``</s>`` (and, at the last step or once K hypotheses are done, the open beams)
    are appended to ``finished``. A sentence that is done keeps K idle rows (score -inf)."""
    kept = []
    for val, idx in zip(top_val, top_idx):
        if val == float("-inf") or len(kept) == K:
            break
        k, tok = divmod(idx, V)
        seq = seqs[b * K + k] + [tok]
        if tok != eos:
            kept.append((b * K + k, tok, val, seq))
        elif len(finished) < K:
            finished.append((normalized(val, len(seq), alpha), seq[:-1]))
    if len(finished) >= K or last:
        if last:
            finished.extend((normalized(val, len(seq), alpha), seq) for _, _, val, seq in kept)
        kept = []
    return kept + [(b * K, eos, float("-inf"), [])] * (K - len(kept))


def beam_search(
    step: StepFn,
    reorder: ReorderFn,
    state: Any,
    batch: int,
    bos: int,
    eos: int,
    max_len: int,
    beam: int = 4,
    alpha: float = 1.0,
    all_steps: bool = False,
) -> list[list[int]]:
    """Best hypothesis per sentence. ``state`` holds ``batch * beam`` rows (sentence b's beams at b*K..).

    Each step extends every open beam by every token, keeps the 2K best candidates per sentence; those
    ending in ``</s>`` become finished hypotheses, the best K others the new beams. A sentence stops once
    it holds K finished hypotheses (or at ``max_len``, when its open beams are finished as they are).
    ``all_steps``: as in :func:`greedy_search`.
    """
    K = beam
    tokens = torch.full((batch * K,), bos, dtype=torch.long)
    scores_BK = torch.full((batch, K), float("-inf"))
    scores_BK[:, 0] = 0.0  # all beams start equal: keep one so that the first step has no duplicates
    seqs: list[list[int]] = [[] for _ in range(batch * K)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    for t in range(max_len):
        logp_NV, state = step(tokens, state)
        V = logp_NV.shape[-1]
        cand_BKV = scores_BK[:, :, None] + logp_NV.float().cpu().view(batch, K, V)
        top_val, top_idx = cand_BKV.view(batch, K * V).topk(min(2 * K, K * V), dim=-1)
        beams = []
        for b in range(batch):
            last = t == max_len - 1
            beams += _advance(
                top_val[b].tolist(), top_idx[b].tolist(), seqs, b, K, V, eos, finished[b], alpha, last
            )
        if t == max_len - 1 or (all(len(f) >= K for f in finished) and not all_steps):
            break
        state = reorder(state, torch.tensor([row for row, _, _, _ in beams], dtype=torch.long))
        tokens = torch.tensor([tok for _, tok, _, _ in beams], dtype=torch.long)
        scores_BK = torch.tensor([val for _, _, val, _ in beams]).view(batch, K)
        seqs = [seq for _, _, _, seq in beams]
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


def translate_batch(
    model: Any,
    src_BS: torch.Tensor,
    src_valid_BS: torch.Tensor | None,
    gate: Any,
    bos: int,
    eos: int,
    max_len: int,
    beam: int = 1,
    alpha: float = 1.0,
    all_steps: bool = False,
    cache_memory: bool = True,
) -> list[list[int]]:
    """Greedy (``beam = 1``) or beam-search output ids (``</s>`` left out) of each source row, with an
    encoder-decoder's cached step (``start_decoding`` / ``decode_step`` / ``reorder_state``): the decoding
    of the translation task's evaluation and of ``evomoe generate``. ``cache_memory=False``: recompute the
    encoder memory's cross-attention keys/values at every step (the slow reference of the cache)."""
    B = src_BS.shape[0]
    state = model.start_decoding(src_BS, src_valid_BS, gate, repeat=beam, cache_memory=cache_memory)
    if beam == 1:
        return greedy_search(model.decode_step, state, B, bos, eos, max_len, all_steps)
    return beam_search(
        model.decode_step, model.reorder_state, state, B, bos, eos, max_len, beam, alpha, all_steps
    )


def exhaustive_search(
    step: StepFn, state_fn: Callable[[], Any], vocab: int, bos: int, eos: int, max_len: int, alpha: float
) -> tuple[float, list[int]]:
    """Slow reference for one sentence: score every sequence of up to ``max_len`` tokens (ending in
    ``</s>``, or open at ``max_len``) with the same length penalty, and return the best."""
    best: tuple[float, list[int]] = (float("-inf"), [])

    def visit(prefix: list[int], score: float) -> None:
        nonlocal best
        state = state_fn()
        logp = None
        for tok in [bos] + prefix:
            logp, state = step(torch.tensor([tok]), state)
        logp_V = logp[0].float()
        for tok in range(vocab):
            s = score + float(logp_V[tok])
            seq = prefix + [tok]
            if tok == eos:
                cand = (normalized(s, len(seq), alpha), prefix)
            elif len(seq) == max_len:
                cand = (normalized(s, len(seq), alpha), seq)
            else:
                visit(seq, s)
                continue
            if cand[0] > best[0]:
                best = cand

    visit([], 0.0)
    return best
