"""Label-smoothed loss against the explicit smoothed distribution; BLEU / chrF from sacrebleu."""

from __future__ import annotations

import pytest
import torch

from evomoe.tasks.seq_metrics import (
    label_smoothed_loss,
    label_smoothed_loss_reference,
    nll_and_correct,
    translation_scores,
)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothing_equals_reference(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g)
    target = torch.randint(0, 7, (12,), generator=g)
    target[[2, 5]] = -100
    fast, n = label_smoothed_loss(logits, target, eps)
    slow, m = label_smoothed_loss_reference(logits, target, eps)
    assert int(n) == int(m) == 10
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_accuracy_counts_only_targets():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    nll, correct, n = nll_and_correct(logits, torch.tensor([0, 0, -100]))
    assert (correct, n) == (1, 2) and nll > 4.9


def test_translation_scores():
    refs = ["the cat sat on the mat", "a dog barked at the moon"]
    perfect = translation_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    partial = translation_scores(["the cat sat on a mat", "a dog howled"], refs)
    assert 0.0 < partial["bleu"] < 100.0 and 0.0 < partial["chrf"] < 100.0
    assert translation_scores(["zzz", "qqq"], refs)["bleu"] == pytest.approx(0.0)
