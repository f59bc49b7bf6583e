"""Losses and metrics of the sequence tasks: label-smoothed cross-entropy, masked-token accuracy, and
corpus BLEU / chrF from ``sacrebleu`` (the standard implementations, so numbers compare with papers).

Legend: N target positions, V vocabulary. Positions whose target is ``ignore_index`` count nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def label_smoothed_loss(
    logits_NV: torch.Tensor, target_N: torch.Tensor, eps: float, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of counted positions); per position (1 - eps) * NLL + eps * mean_v(-log p_v)."""
    loss = F.cross_entropy(
        logits_NV.float(), target_N, ignore_index=ignore_index, label_smoothing=eps, reduction="sum"
    )
    return loss, (target_N != ignore_index).sum()


def label_smoothed_loss_reference(
    logits_NV: torch.Tensor, target_N: torch.Tensor, eps: float, ignore_index: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow twin: cross-entropy against the explicit smoothed distribution eps/V + (1 - eps) * one_hot."""
    logp_NV = torch.log_softmax(logits_NV.double(), -1)
    V = logp_NV.shape[-1]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(target_N.shape[0]):
        t = int(target_N[i])
        if t == ignore_index:
            continue
        q_V = torch.full((V,), eps / V, dtype=torch.float64)
        q_V[t] += 1.0 - eps
        total = total - (q_V * logp_NV[i]).sum()
        count += 1
    return total.float(), torch.tensor(count)


def norm_rows(targets_BS: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """[B] float64, each row the global batch's counted targets / B. A rank's loss is its summed loss over
    the sum of its rows' entries: the whole batch's mean in one process, and a share of it on each of
    several data-parallel ranks such that their averaged gradients equal the one-process gradient (a
    per-rank mean would weight the ranks' tokens unequally when they hold different numbers of targets)."""
    B = targets_BS.shape[0]
    n = float((targets_BS != ignore_index).sum())
    return torch.full((B,), max(n, 1.0) / B, dtype=torch.float64)


def nll_and_correct(
    logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int = IGNORE
) -> tuple[float, int, int]:
    """Summed NLL (nats), correct argmax predictions and counted positions (for loss, ppl, accuracy)."""
    keep = target_N != ignore_index
    logits, target = logits_NV[keep].float(), target_N[keep]
    nll = F.cross_entropy(logits, target, reduction="sum") if target.numel() else torch.zeros(())
    return float(nll.detach()), int((logits.argmax(-1) == target).sum()), int(target.numel())


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU (13a tokenization) and chrF of detokenized sentences, both in [0, 100], with their
    sacrebleu signatures (``bleu_signature``, ``chrf_signature``: what a reported score was computed with)."""
    from sacrebleu.metrics import BLEU, CHRF  # noqa: PLC0415 - only evaluation of translation needs it

    refs = [list(references)]
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": float(bleu.corpus_score(list(hypotheses), refs).score),
        "chrf": float(chrf.corpus_score(list(hypotheses), refs).score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
