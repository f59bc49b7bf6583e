"""Expert-diversify: spawn E experts from a trained dense FFN, and give each MoE layer its gate.

Legend: E experts, D width, F hidden width, H = F (2F for swiglu: gate and up halves).
Spawn modes (spec section 2): ``copy`` (+ relative Gaussian noise), ``mask`` (a fresh random fraction of
hidden neurons zeroed per expert), ``reinit`` (those neurons re-drawn from the init distribution).

Symmetry breaking that keeps the function: after a ``copy`` spawn every expert is the same, so
with a uniform gate the soft phase computes E identical experts and nothing tells them apart. Two spawns
make the experts differ while the layer's output with equal combine weights 1/E (a zero gate, every
expert selected: the start of the DTS soft phase) stays the dense FFN's exactly:
- ``split``: each hidden neuron is kept by k = max(1, round((1 - ratio) E)) experts chosen at random; the
  others zero its output row (its input column stays, so the neuron can grow back); the keepers scale
  the row by E / k, so the mean over experts of every output row is the dense one.
- ``copy`` with ``zero_sum_noise``: Gaussian noise on the output weights only, centred over the experts.
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
    if e.spawn == "split":
        return w1_EDH, split_output_rows(w2_EFD, e.ratio, generator)
    if e.spawn == "copy" and e.zero_sum_noise:
        return w1_EDH, w2_EFD + zero_sum_noise(w2_EFD, e.noise, generator)
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


def split_output_rows(w2_EFD: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``split``: every hidden neuron's output row kept by k of the E experts and scaled by E / k (mean over
    experts = the input's rows, which are identical copies)."""
    E, F_, _ = w2_EFD.shape
    k = max(1, int(round((1.0 - ratio) * E)))
    rank_FE = torch.rand(F_, E, generator=generator).argsort(dim=1).argsort(dim=1)  # a random order per row
    keep_EF = (rank_FE < k).t().to(w2_EFD.device, w2_EFD.dtype)
    return w2_EFD * keep_EF.unsqueeze(2) * (E / k)


def zero_sum_noise(w2_EFD: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Noise of relative std ``sigma`` (of the base weights' std), centred over the experts: sums to 0."""
    noise = torch.randn(w2_EFD.shape, generator=generator, dtype=w2_EFD.dtype, device="cpu").to(w2_EFD.device)
    noise = noise * (sigma * w2_EFD[0].std())
    return noise - noise.mean(dim=0, keepdim=True)


def hidden_units(share: float, d_ff: int) -> int:
    """Hidden width of an expert ``share`` times the layer's dense width ``d_ff`` wide (at least 1)."""
    return max(1, round(share * d_ff))


def expert_hidden(cfg: Config, d_ff: int) -> int:
    """Hidden width of one routed expert: ``moe.expert_width`` times the layer's dense width ``d_ff``."""
    return hidden_units(cfg.moe.expert_width, d_ff)


def narrow_units(E: int, width: int, d_ff: int) -> torch.Tensor:
    """[E, width]: the dense FFN's hidden units each fine-grained expert keeps."""
    return (torch.arange(E).unsqueeze(1) * width + torch.arange(width)) % d_ff


def mean_scale(w2_ENd: torch.Tensor, d_ff: int) -> torch.Tensor:
    """``evolve.narrow_scale = "mean"``: each kept unit's output row times E / (experts holding the unit),
    so that the mean over the experts of their outputs is the dense FFN's (units no expert holds are lost)."""
    E, width = w2_ENd.shape[0], w2_ENd.shape[1]
    idx_EN = narrow_units(E, width, d_ff)
    holders_F = torch.bincount(idx_EN.reshape(-1), minlength=d_ff).to(w2_ENd.dtype)
    return w2_ENd * (E / holders_F[idx_EN]).unsqueeze(2).to(w2_ENd.device)


def narrow_experts(
    w1_EDH: torch.Tensor, w2_EFD: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-grained experts from full-width ones: expert e keeps hidden units (e * width + j) mod d_ff,
    j < width (width <= d_ff). With E * width = d_ff the experts partition the dense FFN's units."""
    E, d_ff = w2_EFD.shape[0], w2_EFD.shape[1]
    if width == d_ff:
        return w1_EDH, w2_EFD
    swiglu = w1_EDH.shape[2] == 2 * d_ff
    idx_EN = narrow_units(E, width, d_ff)
    w1 = torch.stack([w1_EDH[e][:, _neuron_columns(idx_EN[e], d_ff, swiglu)] for e in range(E)])
    w2 = torch.stack([w2_EFD[e][idx_EN[e]] for e in range(E)])
    return w1.contiguous(), w2.contiguous()


def add_shared_experts(
    layer: MoELayer, cfg: Config, base: Experts | None, generator: torch.Generator
) -> None:
    """``moe.shared_experts`` always-on experts of width ``moe.shared_width`` x d_ff: copies of the trained
    dense FFN (``base``, the spawn keeps what phase 1 learned there; width 1) or freshly initialised ones."""
    n = cfg.moe.shared_experts
    if n == 0:
        return
    old = layer.experts
    width = hidden_units(cfg.moe.shared_width, layer.d_ff)
    if base is not None and width != layer.d_ff:
        raise ValueError(
            f"moe.shared_width = {cfg.moe.shared_width}: shared experts spawned from the dense FFN are its "
            "copies (width 1); narrower ones start fresh (evolve.diversify_steps = 0)"
        )
    shared = Experts(n, old.d_model, width, old.activation, old.impl, old.n_layers, bias=old.bias)
    with torch.no_grad():
        if base is not None:
            for name, _ in shared.named_parameters():  # weights and, for an imported FFN, its biases
                getattr(shared, name).copy_(getattr(base, name).data[0].expand_as(getattr(shared, name)))
        else:
            std_in, std_out = init_std(cfg.model.d_model, cfg.model.n_layers)
            shared.w1_EDH.copy_(torch.randn(shared.w1_EDH.shape, generator=generator) * std_in)
            shared.w2_EFD.copy_(torch.randn(shared.w2_EFD.shape, generator=generator) * std_out)
    layer.shared = shared.to(old.w1_EDH.device)


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
    width = expert_hidden(cfg, layer.d_ff)
    if old.bias and width != old.d_ff:
        raise ValueError(
            f"moe.expert_width = {cfg.moe.expert_width}: narrower experts are not supported for an FFN with "
            "biases (an imported model); keep moe.expert_width = 1"
        )
    new = Experts(E, old.d_model, width, old.activation, old.impl, old.n_layers, bias=old.bias)
    new = new.to(old.w1_EDH.device)
    with torch.no_grad():
        w1, w2 = spawn_weights(old.w1_EDH.data[0], old.w2_EFD.data[0], E, cfg, generator)
        w1, w2 = narrow_experts(w1, w2, width)
        if cfg.evolve.narrow_scale == "mean" and width < old.d_ff:
            w2 = mean_scale(w2, old.d_ff)
        new.w1_EDH.copy_(w1)
        new.w2_EFD.copy_(w2)
        if old.bias:
            new.b1_EH.copy_(spawn_bias(old.b1_EH.data[0], w1, old.w1_EDH.data[0]))
            new.b2_ED.copy_(old.b2_ED.data[0].expand_as(new.b2_ED))
    layer.experts = new
    add_shared_experts(layer, cfg, old, generator)
    layer.router = build_router(cfg, **router_info).to(old.w1_EDH.device)
    mapping = {old.w1_EDH: new.w1_EDH, old.w2_EFD: new.w2_EFD}
    if old.bias:
        mapping.update({old.b1_EH: new.b1_EH, old.b2_ED: new.b2_ED})
    return mapping


def spawn_bias(b1_H: torch.Tensor, w1_EDH: torch.Tensor, base_w1_DH: torch.Tensor) -> torch.Tensor:
    """Each expert's hidden bias: the base bias, zeroed for the neurons that ``mask``/``reinit`` changed
    (a changed neuron's input column differs from the base's)."""
    changed_EH = (w1_EDH != base_w1_DH.unsqueeze(0)).any(dim=1)
    return b1_H.unsqueeze(0).repeat(w1_EDH.shape[0], 1).masked_fill(changed_EH, 0.0)


def fresh_layer(layer: MoELayer, cfg: Config, generator: torch.Generator, **router_info) -> dict:
    """Start directly sparse (diversify_steps = 0): E independently initialised experts and a gate."""
    old = layer.experts
    E, width = cfg.moe.num_experts, expert_hidden(cfg, layer.d_ff)
    new = Experts(E, old.d_model, width, old.activation, old.impl, old.n_layers, bias=old.bias)
    std_in, std_out = init_std(cfg.model.d_model, cfg.model.n_layers)
    with torch.no_grad():
        new.w1_EDH.copy_(torch.randn(new.w1_EDH.shape, generator=generator) * std_in)
        new.w2_EFD.copy_(torch.randn(new.w2_EFD.shape, generator=generator) * std_out)
    layer.experts = new.to(old.w1_EDH.device)
    add_shared_experts(layer, cfg, None, generator)
    layer.router = build_router(cfg, **router_info).to(old.w1_EDH.device)
    mapping = {old.w1_EDH: new.w1_EDH, old.w2_EFD: new.w2_EFD}
    if old.bias:  # biases start at zero
        mapping.update({old.b1_EH: new.b1_EH, old.b2_ED: new.b2_ED})
    return mapping


def _each_layer(make, model, cfg: Config, generator, after_layer: AfterLayer | None, router_info) -> dict:
    layers = model.moe_layers()
    mapping: dict = {}
    for layer_idx, layer in enumerate(layers):
        info = {"layer_idx": layer_idx, "num_moe_layers": len(layers), **router_info}
        mapping.update((after_layer or _keep)(layer, make(layer, cfg, generator, **info)))
    routers = [layer.router for layer in layers if layer.router is not None]
    for router in routers:
        router.link(routers)
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
