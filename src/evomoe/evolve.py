"""Expert-diversify: spawn E experts from a trained dense FFN, and give each MoE layer its gate.

Legend: E experts, D width, F hidden width, H = F (2F for swiglu: gate and up halves).
Spawn modes (spec section 2): ``copy`` (+ relative Gaussian noise), ``mask`` (a fresh random fraction of
hidden neurons zeroed per expert), ``reinit`` (those neurons re-drawn from the init distribution).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import Config
from .moe.experts import Experts, init_std
from .moe.layer import MoELayer
from .moe.router import Router
from .registry import ROUTERS


def _neuron_columns(idx_N: torch.Tensor, d_ff: int, swiglu: bool) -> torch.Tensor:
    """Columns of W1 that feed hidden neurons ``idx_N`` (both halves for swiglu)."""
    return torch.cat([idx_N, idx_N + d_ff]) if swiglu else idx_N


def spawn_weights(
    w1_DH: torch.Tensor,
    w2_FD: torch.Tensor,
    num_experts: int,
    cfg: Config,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """E experts' weights from one expert's (pure function of the inputs and the generator)."""
    e = cfg.evolve
    d_ff = w2_FD.shape[0]
    swiglu = w1_DH.shape[1] == 2 * d_ff
    w1_EDH = w1_DH.unsqueeze(0).repeat(num_experts, 1, 1)
    w2_EFD = w2_FD.unsqueeze(0).repeat(num_experts, 1, 1)
    if e.spawn == "copy":
        if e.noise > 0:
            for w, base in ((w1_EDH, w1_DH), (w2_EFD, w2_FD)):
                noise = torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device)
                w.add_(noise * (e.noise * base.std()))
        return w1_EDH, w2_EFD
    n_changed = int(round(e.ratio * d_ff))
    std_in, std_out = init_std(cfg.model.d_model, cfg.model.n_layers)
    first = 1 if e.keep_one else 0
    for i in range(first, num_experts):
        idx_N = torch.randperm(d_ff, generator=generator)[:n_changed].to(w1_DH.device)
        cols = _neuron_columns(idx_N, d_ff, swiglu)
        if e.spawn == "mask":
            w1_EDH[i][:, cols] = 0.0
            w2_EFD[i][idx_N, :] = 0.0
        else:  # reinit
            fresh1 = torch.randn(w1_DH.shape[0], cols.numel(), generator=generator) * std_in
            fresh2 = torch.randn(n_changed, w2_FD.shape[1], generator=generator) * std_out
            w1_EDH[i][:, cols] = fresh1.to(w1_DH)
            w2_EFD[i][idx_N, :] = fresh2.to(w2_FD)
    return w1_EDH, w2_EFD


def build_router(cfg: Config, **info) -> Router:
    """The configured router for one MoE layer. ``info``: ``RouterSpec`` fields (layer_idx,
    num_moe_layers, vocab_size, token_counts)."""
    cls = ROUTERS.get(cfg.router.name)
    return cls.from_config(cfg.router, cfg.model.d_model, cfg.moe.num_experts, **info)


AfterLayer = Callable[[MoELayer, dict], dict]


def _keep(layer: MoELayer, mapping: dict) -> dict:
    return mapping


def spawn_layer(layer: MoELayer, cfg: Config, generator: torch.Generator, **router_info) -> dict:
    """Replace the layer's single expert by E spawned experts and add a gate. Returns old -> new params."""
    if layer.spawned:
        raise RuntimeError("this MoE layer has already spawned its experts")
    old = layer.experts
    E = cfg.moe.num_experts
    new = Experts(E, old.d_model, old.d_ff, old.activation, old.impl, old.n_layers).to(old.w1_EDH.device)
    with torch.no_grad():
        w1, w2 = spawn_weights(old.w1_EDH.data[0], old.w2_EFD.data[0], E, cfg, generator)
        new.w1_EDH.copy_(w1)
        new.w2_EFD.copy_(w2)
    layer.experts = new
    layer.router = build_router(cfg, **router_info).to(old.w1_EDH.device)
    return {old.w1_EDH: new.w1_EDH, old.w2_EFD: new.w2_EFD}


def fresh_layer(layer: MoELayer, cfg: Config, generator: torch.Generator, **router_info) -> dict:
    """Start directly sparse (diversify_steps = 0): E independently initialised experts and a gate."""
    old = layer.experts
    new = Experts(cfg.moe.num_experts, old.d_model, old.d_ff, old.activation, old.impl, old.n_layers)
    std_in, std_out = init_std(cfg.model.d_model, cfg.model.n_layers)
    with torch.no_grad():
        new.w1_EDH.copy_(torch.randn(new.w1_EDH.shape, generator=generator) * std_in)
        new.w2_EFD.copy_(torch.randn(new.w2_EFD.shape, generator=generator) * std_out)
    layer.experts = new.to(old.w1_EDH.device)
    layer.router = build_router(cfg, **router_info).to(old.w1_EDH.device)
    return {old.w1_EDH: new.w1_EDH, old.w2_EFD: new.w2_EFD}


def _each_layer(make, model, cfg: Config, generator, after_layer: AfterLayer | None, router_info) -> dict:
    layers = model.moe_layers()
    mapping: dict = {}
    for layer_idx, layer in enumerate(layers):
        info = {"layer_idx": layer_idx, "num_moe_layers": len(layers), **router_info}
        mapping.update((after_layer or _keep)(layer, make(layer, cfg, generator, **info)))
    return mapping


def spawn_model(
    model: nn.Module,
    cfg: Config,
    generator: torch.Generator,
    after_layer: AfterLayer | None = None,
    **router_info,
) -> dict:
    """Spawn experts in every MoE layer of a model (``model.moe_layers()``), layer by layer; ``after_layer``
    (layer, old -> new params) may reshape each layer right after its spawn (expert parallelism shards it)
    and returns the mapping to keep. Returns old -> new params for the optimizer."""
    return _each_layer(spawn_layer, model, cfg, generator, after_layer, router_info)


def fresh_experts(
    model: nn.Module,
    cfg: Config,
    generator: torch.Generator,
    after_layer: AfterLayer | None = None,
    **router_info,
) -> dict:
    """Start directly sparse in every MoE layer: E freshly initialised experts (see ``fresh_layer``)."""
    return _each_layer(fresh_layer, model, cfg, generator, after_layer, router_info)
