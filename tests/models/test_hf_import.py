"""Import of tiny Llama / Qwen2 / GPT-2 models: logits equal transformers' (fp32, 1e-4), also right after a
copy spawn; bad directories give errors naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from evomoe.config import Config, ConfigError, ModelConfig, MoEConfig  # noqa: E402
from evomoe.evolve import spawn_model  # noqa: E402
from evomoe.models import GPT  # noqa: E402
from evomoe.models.hf.config import resolve_model_config  # noqa: E402
from evomoe.models.hf.load import load_pretrained_weights  # noqa: E402
from evomoe.moe.router import GateState  # noqa: E402

from .hf_tiny import VOCAB, hf_logits, save_tiny  # noqa: E402

FAMILIES = {
    "llama": {},
    "llama_tied_bias": {"family": "llama", "tie": True, "attention_bias": True, "mlp_bias": True},
    "qwen2": {},
    "mistral": {},
    "gpt2": {},
}


def imported(directory, moe_every: int = 1, **overrides) -> GPT:
    mcfg = resolve_model_config(ModelConfig(init_from=str(directory), moe_every=moe_every, **overrides))
    model = GPT(mcfg, MoEConfig(num_experts=4, experts_impl="loop"))
    load_pretrained_weights(model, directory)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_dir(request, tmp_path_factory):
    kw = dict(FAMILIES[request.param])
    family = kw.pop("family", request.param)
    return save_tiny(family, tmp_path_factory.mktemp(request.param), **kw)


def test_import_equals_transformers_and_copy_spawn_keeps_it(tiny_dir):
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, 16))
    want = hf_logits(tiny_dir, idx)
    model = imported(tiny_dir, moe_every=1)
    with torch.no_grad():
        got = model(idx).logits
    assert (got - want).abs().max() < 1e-4
    cfg = Config()
    cfg.model, cfg.moe.num_experts, cfg.evolve.spawn = model.cfg, 4, "copy"
    cfg.router.dts.gumbel = False  # the spawn step's gate: zeros, soft phase at tau_max: every expert
    spawn_model(model, cfg, torch.Generator().manual_seed(0), vocab_size=model.cfg.vocab_size)
    model.train()  # the soft phase is a training-time phase (evaluation is top-1)
    with torch.no_grad():
        spawned = model(idx, gate=GateState(tau=2.0, hard=False)).logits
    assert model.spawned
    assert (spawned - want).abs().max() < 1e-4


def test_explicit_contradiction_names_both_values(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    with pytest.raises(ConfigError, match=r"model.d_model = 64 contradicts .*config.json: hidden_size = 32"):
        resolve_model_config(ModelConfig(init_from=str(d), d_model=64))


def test_bad_directories_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json' not found"):
        resolve_model_config(ModelConfig(init_from=str(tmp_path)))
    d = save_tiny("llama", tmp_path / "m")
    bad = json.loads((d / "config.json").read_text())
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type = 'bert'.*not supported"):
        resolve_model_config(ModelConfig(init_from=str(tmp_path / "bert")))
    # a shard listed in the index but missing
    shard = tmp_path / "sharded"
    shutil.copytree(d, shard)
    (shard / "model.safetensors").rename(shard / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors.*missing"):
        imported(shard)
    # weights of another shape than config.json says
    other = tmp_path / "other"
    shutil.copytree(d, other)
    bad["intermediate_size"] = 40
    (other / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="model.safetensors.*shape"):
        imported(other)
