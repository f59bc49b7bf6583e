"""Export: the transformers model loaded from the exported directory gives evomoe's logits (fp32, 1e-4), for
dense models of each family, for top-1 (Qwen2-MoE) and renormalised top-2 (Mixtral) MoE models and for a
dense masked LM (Megatron-BERT); models no class reproduces get an ExportError that says why. The export
keeps the source model's special ids and context, replaces a directory only when asked, and atomically."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from evomoe.config import Config, ModelConfig, MoEConfig  # noqa: E402
from evomoe.evolve import spawn_model  # noqa: E402
from evomoe.models import GPT  # noqa: E402
from evomoe.models.encdec import EncoderDecoder  # noqa: E402
from evomoe.models.encoder import MaskedLM  # noqa: E402
from evomoe.models.hf.config import source_model  # noqa: E402
from evomoe.models.hf.export import ExportError, plan_export, write_export  # noqa: E402

from .hf_tiny import VOCAB, hf_logits, save_tiny, tiny_tokenizer  # noqa: E402
from .test_hf_import import imported  # noqa: E402


def roundtrip(model: GPT, out, hard: bool = True, source: dict | None = None) -> None:
    plan = plan_export(model, hard, source)
    write_export(plan, out, tiny_tokenizer().to_str())
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 12))
    model.eval()
    with torch.no_grad():
        want = model(idx).logits
    got = hf_logits(out, idx)
    assert (got - want).abs().max() < 1e-4, plan.model_type
    return plan


def spawned(model: GPT, router: str = "dts", moe: dict | None = None, **topk) -> GPT:
    cfg = Config()
    cfg.model, cfg.moe.num_experts, cfg.router.name = model.cfg, 4, router
    cfg.evolve.spawn, cfg.evolve.noise, cfg.router.gate_init = "copy", 0.5, "normal"
    for k, v in (moe or {}).items():
        setattr(cfg.moe, k, v)
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


@pytest.mark.parametrize("renormalize", [False, True])
def test_narrower_experts_export_to_qwen2_moe(tmp_path, renormalize):
    """Fine-grained experts (moe.expert_width < 1): Mixtral's experts have the dense width, Qwen2-MoE's
    their own (moe_intermediate_size)."""
    src = save_tiny("llama", tmp_path / "src")
    model = spawned(imported(src, moe_every=1), "topk", {"expert_width": 0.5}, k=2, renormalize=renormalize)
    plan = roundtrip(model, tmp_path / "out")
    assert plan.model_type == "qwen2_moe" and plan.config["moe_intermediate_size"] == 24


def test_shared_experts_have_no_class(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    model = spawned(imported(src, moe_every=2), "topk", {"shared_experts": 1}, k=1)
    with pytest.raises(ExportError, match="moe.shared_experts = 1: evomoe adds its shared experts ungated"):
        plan_export(model, hard=True)


def test_renormalised_top2_exports_to_mixtral(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    model = spawned(imported(src, moe_every=1), router="topk", k=2, renormalize=True)
    assert roundtrip(model, tmp_path / "out").model_type == "mixtral"


def test_what_no_class_reproduces_is_an_error(tmp_path):
    src = save_tiny("llama", tmp_path / "llama")
    soft = r"^router\.name = 'dts': a DTS gate in its soft phase.*hard switch"
    with pytest.raises(ExportError, match=soft):
        plan_export(spawned(imported(src)), hard=False)
    with pytest.raises(ExportError, match="capacity_factor"):
        plan_export(spawned(imported(src), router="topk", capacity_factor=1.0), hard=True)
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(ExportError, match="grown from GPT-2 has no class"):
        plan_export(spawned(imported(gpt2)), hard=True)


# ---------------------------------------------------------------------------------------- what it keeps


def test_special_ids_and_context_of_the_source(tmp_path):
    """bos/eos/pad come from the source model (config.json, generation_config.json), so transformers'
    generate stops at its end of text; rotary positions keep the source's context."""
    import transformers as tf

    src = save_tiny("llama", tmp_path / "src", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = imported(src, moe_every=2, seq_len=32)
    source = source_model(src)
    plan = roundtrip(model, tmp_path / "out", source=source)
    cfg = tf.AutoConfig.from_pretrained(tmp_path / "out")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.max_position_embeddings == 64 and any("64" in n and "32" in n for n in plan.notes), plan.notes
    # the end of text ends transformers' generate: make the 4th greedy token the source's eos
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    idx = torch.tensor([[5, 9, 11]])
    free = hf.generate(idx, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 3:]
    stop = int(free[3])
    source["config"]["eos_token_id"] = source["generation_config"]["eos_token_id"] = stop
    write_export(plan_export(model, True, source), tmp_path / "out2", tiny_tokenizer().to_str())
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out2", dtype=torch.float32).eval()
    stopped = hf.generate(idx, max_new_tokens=10, do_sample=False)[0, 3:].tolist()
    assert stopped == free[: free.tolist().index(stop) + 1].tolist()


def test_generation_config_eos_list_wins(tmp_path):
    import transformers as tf

    src = save_tiny("qwen2", tmp_path / "src", bos_token_id=1, eos_token_id=2)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    roundtrip(imported(src), tmp_path / "out", source=source_model(src))
    assert tf.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, 7]


def test_learned_positions_are_the_runs_table_and_say_so(tmp_path):
    src = save_tiny("gpt2", tmp_path / "src")  # an imported GPT-2 keeps its whole table (n_positions)
    plan = roundtrip(imported(src), tmp_path / "out", source=source_model(src))
    assert plan.config["n_positions"] == 64 and any("n_positions = 64" in n for n in plan.notes)
    torch.manual_seed(0)
    native = GPT(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, seq_len=32), MoEConfig())
    plan = roundtrip(native, tmp_path / "native")
    assert plan.config["n_positions"] == 32
    assert any("n_positions = 32 (model.seq_len)" in n for n in plan.notes), plan.notes


def test_no_zero_element_tensors(tmp_path):
    """Qwen2-MoE always has a shared expert: it is given width 1 and zero weights (it adds exactly 0)."""
    import transformers as tf

    src = save_tiny("llama", tmp_path / "src")
    roundtrip(spawned(imported(src, moe_every=2), k=1), tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert not [w for w in caught if "zero-element" in str(w.message)]
    assert all(p.numel() > 0 for p in hf.parameters())


# ------------------------------------------------------------------------------------ the target folder


def test_a_non_empty_target_is_replaced_only_when_asked(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    plan = plan_export(imported(src), hard=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"'{out}' is not empty.*--overwrite"):
        write_export(plan, out)
    assert sorted(os.listdir(out)) == ["model.safetensors.index.json", "notes.txt"]
    roundtrip(imported(src), tmp_path / "first")  # the same model, for its logits
    write_export(plan, out, tiny_tokenizer().to_str(), overwrite=True)
    assert not (out / "model.safetensors.index.json").exists() and not (out / "notes.txt").exists()
    idx = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(hf_logits(out, idx), hf_logits(tmp_path / "first", idx))
    assert sorted(os.listdir(tmp_path)) == ["first", "out", "src"]  # no temporary folder left beside it


def test_a_failed_export_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    import transformers as tf

    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def broken(self, directory, **kw):
        (directory / "config.json").write_text("{}")  # partly written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="No space left"):
        write_export(plan_export(imported(src), hard=True), out, overwrite=True)
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out", "src"]


# ---------------------------------------------------------------------------------- masked LM, enc-dec


def masked_lm(**model) -> MaskedLM:
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, seq_len=24, **model)
    lm = MaskedLM(mcfg, MoEConfig(num_experts=4, enabled=False))
    with torch.no_grad():  # a trained model's norms and biases are not at their initial values
        for name, p in lm.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return lm.eval()


@pytest.mark.parametrize("biases", [False, True])
def test_dense_masked_lm_exports_to_megatron_bert(tmp_path, biases):
    import transformers as tf

    lm = masked_lm(qkv_bias=biases, out_bias=biases, mlp_bias=biases)
    plan = plan_export(lm, hard=True)
    assert plan.model_type == "megatron-bert"
    write_export(plan, tmp_path / "out")
    hf = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = lm(idx).logits, hf(idx).logits
    assert (got - want).abs().max() < 1e-4


def test_what_no_masked_lm_or_translation_class_reproduces(tmp_path):
    with pytest.raises(ExportError, match="model.activation = 'gelu_tanh'"):
        plan_export(masked_lm(activation="gelu_tanh"), hard=True)
    with pytest.raises(ExportError, match="model.norm_eps = 1e-06"):
        plan_export(masked_lm(norm_eps=1e-6), hard=True)
    moe = MaskedLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48), MoEConfig())
    cfg = Config()
    cfg.model, cfg.moe.num_experts = moe.cfg, 8
    spawn_model(moe, cfg, torch.Generator().manual_seed(0), vocab_size=VOCAB)
    with pytest.raises(ExportError, match="no transformers masked-LM class has MoE feed-forward layers"):
        plan_export(moe, hard=True)
    mt = EncoderDecoder(
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_ff=48), MoEConfig()
    )
    cfg.model = mt.cfg
    spawn_model(mt, cfg, torch.Generator().manual_seed(0), vocab_size=VOCAB)
    with pytest.raises(ExportError, match="no transformers encoder-decoder class with MoE"):
        plan_export(mt, hard=True)


@torch.no_grad()
def test_dense_translation_model_exports_to_blenderbot(tmp_path):
    """Same logits (teacher forcing, padded sources) and the same greedy translation as evomoe's decoder."""
    import transformers as tf

    from evomoe.models.decoding import translate_batch

    torch.manual_seed(0)
    shape = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, seq_len=20, qkv_bias=True
    )
    mt = EncoderDecoder(shape, MoEConfig(enabled=False)).eval()
    with torch.no_grad():
        for name, p in mt.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    bos, eos, pad = VOCAB - 2, VOCAB - 1, VOCAB - 4
    tokenizer = type("Specials", (), {"bos_id": bos, "eos_id": eos, "pad_id": pad})()
    plan = plan_export(mt, True, None, tokenizer)
    assert plan.model_type == "blenderbot" and plan.config["decoder_start_token_id"] == bos
    write_export(plan, tmp_path / "out")
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(0, 250, (2, 9), generator=g), torch.randint(0, 250, (2, 7), generator=g)
    src_valid = torch.ones_like(src, dtype=torch.bool)
    src_valid[1, 6:] = False  # a padded source
    src[1, 6:] = pad
    want = mt(src, tgt, src_valid).logits
    got = hf(input_ids=src, attention_mask=src_valid.long(), decoder_input_ids=tgt).logits
    assert (got - want).abs().max() < 1e-4
    ours = translate_batch(mt, src[:1], None, None, bos, eos, 12)[0]
    theirs = hf.generate(src[:1], max_new_tokens=12, do_sample=False, num_beams=1)[0, 1:].tolist()
    assert theirs[: len(ours)] == ours and (len(theirs) == len(ours) or theirs[len(ours)] == eos)
