"""Config: presets, validation errors that name the field and the value, CLI overrides, TOML round trip."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomoe.config import (
    SCHEMA_VERSION,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    preset_names,
    to_dict,
    to_toml,
)


@pytest.mark.parametrize("name", ["tiny", "default", "small"])
def test_presets_load(name):
    if name not in preset_names():
        pytest.skip(f"no preset '{name}' in this tree")
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.moe.num_experts % cfg.parallel.ep == 0


def test_every_preset_loads():
    assert {"tiny", "default"} <= set(preset_names())
    for name in preset_names():
        load_config(name)


def test_tiny_preset_values():
    cfg = load_config("tiny")
    assert cfg.model.d_model == 64 and cfg.moe.num_experts == 4
    assert cfg.evolve.diversify_steps < cfg.train.steps
    assert cfg.data.tokenizer == "bytes"


def test_no_config_is_the_defaults():
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "data,field,value",
    [
        ({"train": {"lrr": 1e-3}}, "train.lrr", "0.001"),  # unknown key
        ({"routerr": {"name": "dts"}}, "routerr", "dts"),  # unknown table
        ({"router": {"dts": {"treshold": 0.5}}}, "router.dts.treshold", "0.5"),
        ({"train": {"steps": "ten"}}, "train.steps", "'ten'"),  # wrong type
        ({"train": {"steps": 1.5}}, "train.steps", "1.5"),
        ({"train": {"compile": 1}}, "train.compile", "1"),
        ({"train": {"lr": True}}, "train.lr", "True"),
        ({"model": {"activation": 3}}, "model.activation", "3"),
        ({"train": "fast"}, "train", "'fast'"),  # a value where a table belongs
        ({"train": {"lr": -1.0}}, "train.lr", "-1.0"),  # impossible values
        ({"model": {"activation": "tanh"}}, "model.activation", "'tanh'"),
        ({"router": {"dts": {"threshold": 1.5}}}, "router.dts.threshold", "1.5"),
        ({"gate": {"tau_min": 3.0}}, "gate.tau_min", "3.0"),
        ({"gate": {"decay_steps": 0}}, "gate.decay_steps", "0"),
        ({"router": {"name": "nope"}}, "router.name", "'nope'"),
        ({"router": {"topk": {"k": 9}}}, "router.topk.k", "9"),
        ({"router": {"name": "dselect_k", "dselect_k": {"k": 9}}}, "router.dselect_k.k", "9"),
        ({"router": {"dselect_k": {"gamma": 0.0}}}, "router.dselect_k.gamma", "0.0"),
        ({"router": {"dselect_k": {"reach_weight": -1.0}}}, "router.dselect_k.reach_weight", "-1.0"),
        ({"router": {"name": "comet", "comet": {"k": 0}}}, "router.comet.k", "0"),
        ({"router": {"comet": {"entropy_weight": -1.0}}}, "router.comet.entropy_weight", "-1.0"),
        ({"router": {"comet": {"min_reach": 1.0}}}, "router.comet.min_reach", "1.0"),
        ({"router": {"comet": {"iters_end": 0}}}, "router.comet.iters_end", "0"),
        ({"evolve": {"spawn": "clone"}}, "evolve.spawn", "'clone'"),
        ({"evolve": {"diversify_steps": 5000}}, "evolve.diversify_steps", "5000"),
        ({"moe": {"num_experts": 0}}, "moe.num_experts", "0"),
        ({"parallel": {"ep": 3}}, "parallel.ep", "3"),
    ],
)
def test_bad_values_name_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    msg = str(info.value)
    assert field in msg and value in msg, msg


def test_expert_parallel_must_divide_experts():
    cfg = config_from_dict({"moe": {"num_experts": 8}, "parallel": {"ep": 4}})
    assert cfg.parallel.ep == 4
    with pytest.raises(ConfigError, match=r"parallel\.ep.*must divide moe\.num_experts=8"):
        config_from_dict({"moe": {"num_experts": 8}, "parallel": {"ep": 3}})
    with pytest.raises(ConfigError, match=r"parallel\.ep"):
        config_from_dict({"parallel": {"ep": 0}})


def test_ints_accepted_for_floats():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "text,keys,value",
    [
        ("--train.lr=1e-3", ["train", "lr"], 1e-3),
        ("--router.name=topk", ["router", "name"], "topk"),
        ("--train.compile=true", ["train", "compile"], True),
        ("--moe.enabled=false", ["moe", "enabled"], False),
        ("--train.steps=10", ["train", "steps"], 10),
        ("router.topk.capacity_factor=1.25", ["router", "topk", "capacity_factor"], 1.25),
        ('--data.corpus="/tmp/my corpus"', ["data", "corpus"], "/tmp/my corpus"),
        ("--data.extensions=.py,.txt", ["data", "extensions"], ".py,.txt"),
        ("--data.corpus=a=b", ["data", "corpus"], "a=b"),
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_apply_overrides():
    cfg = apply_overrides(
        Config(),
        [
            "--train.lr=1e-3",
            "--router.name=topk",
            "--router.topk.k=2",
            "--train.compile=true",
            "--moe.enabled=false",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.router.name == "topk" and cfg.router.topk.k == 2
    assert cfg.train.compile is True and cfg.moe.enabled is False


def test_load_config_with_overrides():
    cfg = load_config("tiny", ["--train.steps=7", "--evolve.diversify_steps=3", "--gate.decay=cosine"])
    assert (cfg.train.steps, cfg.evolve.diversify_steps, cfg.gate.decay) == (7, 3, "cosine")


@pytest.mark.parametrize(
    "text,field",
    [
        ("--train.lr", "train.lr"),  # no value
        ("--train..lr=1", "train..lr"),
        ("--train.lr=fast", "train.lr"),
        ("--train.compile=yes", "train.compile"),
        ("--train.lrr=1", "train.lrr"),
        ("--model.n_heads=3", "model.d_model"),  # 128 is not divisible by 3
    ],
)
def test_bad_overrides(text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(Config(), [text])


def test_missing_config_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="choose from"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_preset_toml_round_trip(tmp_path, name):
    cfg = load_config(name)
    path = tmp_path / "cfg.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(str(path)) == cfg


_text = st.text(min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lr=st.floats(1e-8, 10.0, allow_nan=False, allow_infinity=False),
    seed=st.integers(0, 2**62),
    compile_=st.booleans(),
    activation=st.sampled_from(["gelu", "relu", "swiglu"]),
    threshold=st.floats(0.0, 0.999),
    corpus=_text,
    cache_dir=st.text(max_size=30),
    decay=st.sampled_from(["linear", "exponential", "cosine"]),
    num_experts=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_toml_round_trip(
    tmp_path, lr, seed, compile_, activation, threshold, corpus, cache_dir, decay, num_experts
):
    cfg = Config()
    cfg.train.lr, cfg.train.seed, cfg.train.compile = lr, seed, compile_
    cfg.model.activation, cfg.router.dts.threshold, cfg.gate.decay = activation, threshold, decay
    cfg.data.corpus, cfg.data.cache_dir = corpus, cache_dir
    cfg.moe.num_experts = num_experts
    path = tmp_path / "round_trip.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    loaded = load_config(str(path))
    assert loaded == cfg
    assert to_dict(loaded) == to_dict(cfg)


def test_to_toml_covers_every_field():
    text = to_toml(Config())
    assert text.startswith(f"schema = {SCHEMA_VERSION}\n")
    for f in dataclasses.fields(Config):
        if f.name != "schema":
            assert f"[{f.name}]" in text
    assert "[router.dts]" in text and "[router.topk]" in text
