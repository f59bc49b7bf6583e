"""Expert-diversify (spec section 2): spawn modes, output preserved by copies, optimizer state rebuilt."""

from __future__ import annotations

import pytest
import torch

from evomoe.config import Config
from evomoe.evolve import fresh_experts, spawn_layer, spawn_model, spawn_weights
from evomoe.models import GPT
from evomoe.moe.experts import init_std
from evomoe.moe.layer import MoELayer
from evomoe.moe.router import GateState
from evomoe.tasks.lm import lm_forward
from evomoe.train.optim import build_optimizer, rebuild_after_spawn

D_MODEL, D_FF, E = 16, 32, 4


def small_cfg(**evolve) -> Config:
    cfg = Config()
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers = 50, D_MODEL, 2
    cfg.model.n_heads, cfg.model.seq_len, cfg.model.d_ff = 2, 16, D_FF
    cfg.moe.num_experts = E
    for k, v in evolve.items():
        setattr(cfg.evolve, k, v)
    return cfg


def base_weights(activation: str = "gelu", seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H = 2 * D_FF if activation == "swiglu" else D_FF
    return torch.randn(D_MODEL, H, generator=g) * 0.02, torch.randn(D_FF, D_MODEL, generator=g) * 0.01


def spawn(activation="gelu", seed=0, **evolve):
    w1, w2 = base_weights(activation)
    cfg = small_cfg(**evolve)
    w1_EDH, w2_EFD = spawn_weights(w1, w2, E, cfg, torch.Generator().manual_seed(seed))
    assert w1_EDH.shape == (E, *w1.shape) and w2_EFD.shape == (E, *w2.shape)
    return w1, w2, w1_EDH, w2_EFD


def changed_neurons(w1_e, w2_e, w1, w2, swiglu: bool) -> tuple[set, set, set]:
    """Hidden neurons whose W1 column (each swiglu half) or W2 row differs from the base."""
    cols = (w1_e != w1).any(0)
    gate_half = set(torch.nonzero(cols[:D_FF]).squeeze(1).tolist())
    up_half = set(torch.nonzero(cols[D_FF:]).squeeze(1).tolist()) if swiglu else gate_half
    rows = set(torch.nonzero((w2_e != w2).any(1)).squeeze(1).tolist())
    return gate_half, up_half, rows


# ----------------------------------------------------------------------------------------------------
# spawn_weights


def test_copy_gives_identical_experts():
    w1, w2, w1_EDH, w2_EFD = spawn(spawn="copy", noise=0.0)
    for e in range(E):
        assert torch.equal(w1_EDH[e], w1) and torch.equal(w2_EFD[e], w2)


def test_copy_with_noise_has_the_relative_scale():
    sigma = 0.1
    w1, w2, w1_EDH, w2_EFD = spawn(spawn="copy", noise=sigma)
    for w_E, base in ((w1_EDH, w1), (w2_EFD, w2)):
        rel = (w_E - base).std(dim=(1, 2)) / base.std()
        assert torch.allclose(rel, torch.full((E,), sigma), rtol=0.15), rel
        assert not torch.equal(w_E[0], w_E[1])  # each copy gets its own noise


def test_spawn_is_a_pure_function_of_the_generator():
    a = spawn(spawn="reinit", seed=3)
    b = spawn(spawn="reinit", seed=3)
    c = spawn(spawn="reinit", seed=4)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert not torch.equal(a[2], c[2])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("keep_one", [True, False])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_mask_zeroes_round_r_F_neurons(activation, keep_one, ratio):
    swiglu = activation == "swiglu"
    w1, w2, w1_EDH, w2_EFD = spawn(activation, spawn="mask", ratio=ratio, keep_one=keep_one)
    n = int(round(ratio * D_FF))
    masks = []
    for e in range(E):
        if e == 0 and keep_one:
            assert torch.equal(w1_EDH[0], w1) and torch.equal(w2_EFD[0], w2)
            continue
        gate_half, up_half, rows = changed_neurons(w1_EDH[e], w2_EFD[e], w1, w2, swiglu)
        assert len(rows) == n
        assert gate_half == up_half == rows  # the same neurons in W1 (both swiglu halves) and W2
        idx = sorted(rows)
        cols = idx + [i + D_FF for i in idx] if swiglu else idx
        assert torch.count_nonzero(w1_EDH[e][:, cols]) == 0
        assert torch.count_nonzero(w2_EFD[e][idx]) == 0
        masks.append(frozenset(idx))
    assert len(set(masks)) > 1  # a fresh random subset per expert


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_reinit_redraws_chosen_neurons(activation):
    swiglu = activation == "swiglu"
    ratio = 0.5
    w1, w2, w1_EDH, w2_EFD = spawn(activation, spawn="reinit", ratio=ratio, keep_one=True)
    n = int(round(ratio * D_FF))
    std_in, std_out = init_std(D_MODEL, 2)
    assert torch.equal(w1_EDH[0], w1) and torch.equal(w2_EFD[0], w2)
    for e in range(1, E):
        gate_half, up_half, rows = changed_neurons(w1_EDH[e], w2_EFD[e], w1, w2, swiglu)
        assert len(rows) == n and gate_half == up_half == rows
        idx = sorted(rows)
        cols = idx + [i + D_FF for i in idx] if swiglu else idx
        new1, new2 = w1_EDH[e][:, cols], w2_EFD[e][idx]
        assert torch.count_nonzero(new1) == new1.numel() and torch.count_nonzero(new2) == new2.numel()
        assert (new1 != w1[:, cols]).all() and (new2 != w2[idx]).all()
        assert new1.std().item() == pytest.approx(std_in, rel=0.25)
        assert new2.std().item() == pytest.approx(std_out, rel=0.25)
        keep = [i for i in range(D_FF) if i not in rows]
        keep_cols = keep + [i + D_FF for i in keep] if swiglu else keep
        assert torch.equal(w1_EDH[e][:, keep_cols], w1[:, keep_cols])
        assert torch.equal(w2_EFD[e][keep], w2[keep])


def test_spawn_layer_twice_raises():
    cfg = small_cfg()
    layer = MoELayer(D_MODEL, D_FF, "gelu")
    mapping = spawn_layer(layer, cfg, torch.Generator().manual_seed(0))
    assert len(mapping) == 2 and layer.experts.num_experts == E
    with pytest.raises(RuntimeError):
        spawn_layer(layer, cfg, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------
# the model right after the spawn


def build_gpt(cfg: Config, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg.model, cfg.moe)


@pytest.mark.parametrize(
    "router,gate_init", [("dts", "zeros"), ("dts", "normal"), ("soft", "zeros"), ("soft", "normal")]
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_copy_spawn_preserves_gpt_output(router, gate_init, activation):
    cfg = small_cfg(spawn="copy", noise=0.0)
    cfg.model.activation = activation
    cfg.router.name, cfg.router.gate_init = router, gate_init
    cfg.router.dts.threshold = 0.0
    model = build_gpt(cfg).train()
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    before = lm_forward(model, idx, idx).logits.detach()
    spawn_model(model, cfg, torch.Generator().manual_seed(0))
    assert model.spawned and all(layer.num_experts == E for layer in model.moe_layers())
    torch.manual_seed(2)
    out = lm_forward(model, idx, idx, gate=GateState(tau=2.0))
    assert all(int(s.pairs) == 3 * 16 * E for s in out.stats)  # every token to every expert
    torch.testing.assert_close(out.logits.detach(), before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# optimizer state after the spawn (evomoe.train.optim.rebuild_after_spawn)


def trained_dense(cfg: Config):
    model = build_gpt(cfg).train()
    opt = build_optimizer(model, cfg.train)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        lm_forward(model, idx, idx).loss.backward()
        opt.step()
    return model, opt, idx


@pytest.mark.parametrize("mode", ["fresh", "copy"])
def test_rebuild_after_spawn(mode):
    cfg = small_cfg(spawn="copy", opt_state=mode)
    cfg.router.gate_init = "normal"
    model, old, idx = trained_dense(cfg)
    old_experts = [(layer.experts.w1_EDH, layer.experts.w2_EFD) for layer in model.moe_layers()]
    untouched = {n: p for n, p in model.named_parameters() if ".ffn." not in n}
    untouched_state = {n: {k: v.clone() for k, v in old.state[p].items()} for n, p in untouched.items()}
    mapping = spawn_model(model, cfg, torch.Generator().manual_seed(0))
    new = rebuild_after_spawn(old, model, cfg.train, mapping, mode)

    in_groups = [p for g in new.param_groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in model.parameters()})
    assert {id(p) for p in in_groups} == {id(p) for p in model.parameters()}
    assert all(g["lr"] == old.param_groups[0]["lr"] for g in new.param_groups)
    decayed = {id(p) for g in new.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for layer in model.moe_layers():  # experts decay like the dense FFN did; the gates do not
        assert id(layer.experts.w1_EDH) in decayed and id(layer.router.gate.weight) not in decayed
    for n, p in untouched.items():  # survivors keep their moments and step count
        for k, v in untouched_state[n].items():
            assert torch.equal(new.state[p][k], v), (n, k)
    for layer, (old_w1, old_w2) in zip(model.moe_layers(), old_experts, strict=True):
        assert mapping[old_w1] is layer.experts.w1_EDH and mapping[old_w2] is layer.experts.w2_EFD
        assert not new.state.get(layer.router.gate.weight)  # the new gate starts fresh
        for old_p, new_p in ((old_w1, layer.experts.w1_EDH), (old_w2, layer.experts.w2_EFD)):
            src = old.state[old_p]
            if mode == "fresh":
                assert not new.state.get(new_p)
            else:
                st = new.state[new_p]
                assert torch.equal(st["step"], src["step"])
                for k in ("exp_avg", "exp_avg_sq"):
                    assert st[k].shape == new_p.shape
                    for e in range(E):
                        assert torch.equal(st[k][e], src[k][0])
                    assert st[k].data_ptr() != src[k].data_ptr()

    new.zero_grad()  # the rebuilt optimizer steps
    lm_forward(model, idx, idx, gate=GateState(tau=1.0)).loss.backward()
    new.step()
    some = next(iter(untouched.values()))
    assert float(new.state[some]["step"]) == float(untouched_state[next(iter(untouched))]["step"]) + 1
    w1 = model.moe_layers()[0].experts.w1_EDH
    assert float(new.state[w1]["step"]) == (1.0 if mode == "fresh" else 3.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fresh_experts_start_sparse():
    """diversify_steps = 0: E independently initialised experts and a gate in every MoE layer."""
    cfg = small_cfg()
    model = build_gpt(cfg)
    mapping = fresh_experts(model, cfg, torch.Generator().manual_seed(0))
    std_in, std_out = init_std(D_MODEL, 2)
    assert len(mapping) == 2 * len(model.moe_layers())
    for layer in model.moe_layers():
        assert layer.spawned and layer.experts.num_experts == E
        w1 = layer.experts.w1_EDH.detach()
        assert not torch.equal(w1[0], w1[1])
        assert w1.std().item() == pytest.approx(std_in, rel=0.1)
        assert layer.experts.w2_EFD.detach().std().item() == pytest.approx(std_out, rel=0.1)
