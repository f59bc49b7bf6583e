"""Export: the transformers model loaded from the exported directory gives evomoe's logits (fp32, 1e-4), for
dense models of each family and for top-1 (Qwen2-MoE) and renormalised top-2 (Mixtral) MoE models; models
no class reproduces get an ExportError that says why."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from evomoe.config import Config, ModelConfig, MoEConfig  # noqa: E402
from evomoe.evolve import spawn_model  # noqa: E402
from evomoe.models import GPT  # noqa: E402
from evomoe.models.hf.export import ExportError, plan_export, write_export  # noqa: E402

from .hf_tiny import VOCAB, hf_logits, save_tiny, tiny_tokenizer  # noqa: E402
from .test_hf_import import imported  # noqa: E402


def roundtrip(model: GPT, out, hard: bool = True) -> None:
    plan = plan_export(model, hard)
    write_export(plan, out, tiny_tokenizer().to_str())
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 12))
    model.eval()
    with torch.no_grad():
        want = model(idx).logits
    got = hf_logits(out, idx)
    assert (got - want).abs().max() < 1e-4, plan.model_type
    return plan


def spawned(model: GPT, router: str = "dts", **topk) -> GPT:
    cfg = Config()
    cfg.model, cfg.moe.num_experts, cfg.router.name = model.cfg, 4, router
    cfg.evolve.spawn, cfg.evolve.noise, cfg.router.gate_init = "copy", 0.5, "normal"
    for k, v in topk.items():
        setattr(cfg.router.topk, k, v)
    spawn_model(model, cfg, torch.Generator().manual_seed(0), vocab_size=model.cfg.vocab_size)
    with torch.no_grad():  # a trained gate is far from uniform
        for layer in model.moe_layers():
            layer.router.gate.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_dense_export_to_its_family(family, tmp_path):
    src = save_tiny(family, tmp_path / "src")
    plan = roundtrip(imported(src, moe_every=2), tmp_path / "out")
    assert plan.model_type == family
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_native_dense_export(style, tmp_path):
    torch.manual_seed(0)
    act = "swiglu" if style == "llama" else "gelu"
    mcfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=40, seq_len=32, style=style)
    mcfg.activation, mcfg.n_kv_heads = act, (2 if style == "llama" else 0)
    plan = roundtrip(GPT(mcfg, MoEConfig(num_experts=4)), tmp_path / "out")
    assert plan.model_type == {"llama": "llama", "gpt2": "gpt2"}[style]


@pytest.mark.parametrize("family,router", [("llama", "dts"), ("qwen2", "dts"), ("llama", "topk")])
def test_top1_moe_exports_to_qwen2_moe(family, router, tmp_path):
    """DTS (hard phase / evaluation) and Switch: weight = softmax probability of the argmax expert."""
    src = save_tiny(family, tmp_path / "src")
    model = spawned(imported(src, moe_every=2), router=router, k=1)
    plan = roundtrip(model, tmp_path / "out", hard=True)
    assert plan.model_type == "qwen2_moe"
    assert plan.config["num_experts_per_tok"] == 1 and not plan.config["norm_topk_prob"]


def test_renormalised_top2_exports_to_mixtral(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    model = spawned(imported(src, moe_every=1), router="topk", k=2, renormalize=True)
    assert roundtrip(model, tmp_path / "out").model_type == "mixtral"


def test_what_no_class_reproduces_is_an_error(tmp_path):
    src = save_tiny("llama", tmp_path / "llama")
    with pytest.raises(ExportError, match="soft phase.*after the hard switch"):
        plan_export(spawned(imported(src)), hard=False)
    with pytest.raises(ExportError, match="capacity_factor"):
        plan_export(spawned(imported(src), router="topk", capacity_factor=1.0), hard=True)
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(ExportError, match="grown from GPT-2 has no class"):
        plan_export(spawned(imported(gpt2)), hard=True)
