"""The encoder (masked LM) and the encoder-decoder against slow references: a spawned 1-expert MoE equals the
dense FFN, padding changes nothing at the real positions (attention and routing), and cached incremental
decoding equals re-decoding the whole prefix."""

from __future__ import annotations

import pytest
import torch

from evomoe.models.encdec import EncoderDecoder
from evomoe.models.encoder import MaskedLM
from evomoe.moe.router import GateState

from .seq_helpers import V, padded, spawn, tiny_cfg

ROUTERS = ["dts", "switch", "gshard", "base", "hash", "stablemoe"]


def mlm_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, valid = padded(torch.randint(1, V, (3, 9), generator=g), [9, 6, 4])
    return {"tokens_BS": ids, "valid_BS": valid}


def mt_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    src, src_valid = padded(torch.randint(1, V, (3, 8), generator=g), [8, 5, 3])
    tgt, tgt_valid = padded(torch.randint(1, V, (3, 6), generator=g), [6, 6, 2])
    return {"src_BS": src, "src_valid_BS": src_valid, "tgt_BT": tgt, "tgt_valid_BT": tgt_valid}


def real(x):
    return x["valid_BS"] if "valid_BS" in x else x["tgt_valid_BT"]


def router_cfg(router, experts):
    cfg = tiny_cfg(router if router in ("dts", "base", "hash", "stablemoe") else "topk", experts)
    if router == "gshard":
        cfg.router.topk.k = min(2, experts)
    return cfg


@pytest.mark.parametrize("model_cls,inputs", [(MaskedLM, mlm_inputs), (EncoderDecoder, mt_inputs)])
@pytest.mark.parametrize("router", ["dts", "switch", "hash"])
def test_one_expert_moe_equals_dense(model_cls, inputs, router):
    torch.manual_seed(0)
    cfg = router_cfg(router, 1)
    model = model_cls(cfg.model, cfg.moe).eval()
    x = inputs()
    dense = model(**x, gate=GateState()).logits
    spawn(model, cfg)
    assert model.spawned and len(model.moe_layers()) == (2 if model_cls is MaskedLM else 4)
    out = model(**x, gate=GateState(tau=1.0, step=5))
    keep = real(x)  # padding is not routed (its FFN output is 0): compare the real positions
    torch.testing.assert_close(out.logits[keep], dense[keep], atol=1e-5, rtol=1e-5)
    assert len(out.stats) == len(model.moe_layers())


@pytest.mark.parametrize("router", ["dts", "switch", "gshard", "base", "hash"])
@pytest.mark.parametrize("model_cls,inputs", [(MaskedLM, mlm_inputs), (EncoderDecoder, mt_inputs)])
def test_padding_changes_nothing_at_real_positions(model_cls, inputs, router):
    """Padded rows vs each sentence alone: attention and routing never see the padding (sparse phase)."""
    torch.manual_seed(0)
    cfg = router_cfg(router, 4)
    model = model_cls(cfg.model, cfg.moe)
    spawn(model, cfg)
    model.eval()  # after the spawn: the new routers are built in training mode
    x = inputs()
    gate = GateState(tau=0.5, hard=True, step=50)
    batched = model(**x, gate=gate).logits
    lengths = real(x).sum(1)
    for b in range(3):
        if model_cls is MaskedLM:
            one = {"tokens_BS": x["tokens_BS"][b : b + 1, : lengths[b]]}
        else:
            s = int(x["src_valid_BS"][b].sum())
            one = {"src_BS": x["src_BS"][b : b + 1, :s], "tgt_BT": x["tgt_BT"][b : b + 1, : lengths[b]]}
        alone = model(**one, gate=gate).logits
        torch.testing.assert_close(batched[b : b + 1, : lengths[b]], alone, atol=1e-5, rtol=1e-5)


def test_padding_not_routed_or_counted():
    cfg = router_cfg("dts", 4)
    model = EncoderDecoder(cfg.model, cfg.moe).train()
    spawn(model, cfg)
    x = mt_inputs()
    out = model(**x, gate=GateState(tau=2.0, step=1))
    n_src, n_tgt = int(x["src_valid_BS"].sum()), int(x["tgt_valid_BT"].sum())
    assert [int(s.tokens) for s in out.stats] == [n_src, n_src, n_tgt, n_tgt]
    assert "balance" in out.aux


@pytest.mark.parametrize("phase", ["dense", "sparse"])
def test_incremental_decoding_equals_full_redecoding(phase):
    torch.manual_seed(0)
    cfg = router_cfg("dts", 4)
    model = EncoderDecoder(cfg.model, cfg.moe)
    if phase == "sparse":
        spawn(model, cfg)
    model.eval()
    x = mt_inputs()
    gate = GateState(tau=0.5, hard=True, step=50)
    state = model.start_decoding(x["src_BS"], x["src_valid_BS"], gate)
    tokens = x["tgt_BT"]
    for t in range(tokens.shape[1]):
        step_logp, state = model.decode_step(tokens[:, t], state)
        prefix = {"src_BS": x["src_BS"], "src_valid_BS": x["src_valid_BS"], "tgt_BT": tokens[:, : t + 1]}
        full = torch.log_softmax(model(**prefix, gate=gate).logits[:, -1].float(), -1)
        torch.testing.assert_close(step_logp, full, atol=1e-5, rtol=1e-5)
