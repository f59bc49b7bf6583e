"""evomoe's MoE layer against its peers on the same weights and tokens (forward + backward).

    python benchmarks/peers.py [--quick] [--threads N]

1. Hugging Face transformers' ``MixtralSparseMoeBlock`` (built from a ``MixtralConfig``, no download;
   ``transformers`` is the optional ``bench`` dependency: ``pip install -e .[bench]``) with its ``eager``
   and ``grouped_mm`` experts backends, loaded with our router's and experts' weights: outputs and input
   gradients are checked to match ours, then all are timed interleaved, with the iso-FLOP dense FFN.
2. The EvoMoE reference formulation (what evomoe replaces): a dense [T, E, T] combine tensor built with
   ``diag_embed`` and every expert run on every token slot (capacity T), written below as
   ``reference_layer``. Same gate, same soft-phase selection (DTS, no noise, a threshold giving ~2
   experts per token), E = 16. Time and peak memory of the dispatch + combine alone (identity experts) and
   of the whole layer, where they fit in memory. Targets: >= 10x faster, >= 100x less dispatch memory.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from evomoe.config import router_config  # noqa: E402
from evomoe.moe.dispatcher import LocalDispatcher  # noqa: E402
from evomoe.moe.experts import Experts  # noqa: E402
from evomoe.moe.layer import MoELayer  # noqa: E402
from evomoe.moe.router import GateState, RouterContext  # noqa: E402
from evomoe.moe.routers.dts import DTSRouter  # noqa: E402
from evomoe.moe.routers.topk import TopKRouter  # noqa: E402

D_MODEL, D_FF = 512, 1024


# ------------------------------------------------------------------------------------------ Mixtral
def ours_topk(E: int, k: int) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_FF, "swiglu")
    layer.experts = Experts(E, D_MODEL, D_FF, "swiglu")
    cfg = router_config(name="topk", gate_init="normal")
    cfg.topk.k = k
    layer.router = TopKRouter.from_config(cfg, D_MODEL, E)
    return layer


def mixtral_block(layer: MoELayer, backend: str):
    """A transformers Mixtral sparse MoE block holding ``layer``'s weights (None if not installed)."""
    try:
        from transformers import MixtralConfig  # noqa: PLC0415
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: PLC0415
    except ImportError:
        return None
    E = layer.experts.num_experts
    cfg = MixtralConfig(
        hidden_size=D_MODEL,
        intermediate_size=D_FF,
        num_local_experts=E,
        num_experts_per_tok=layer.router.cfg.k,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    cfg._experts_implementation = backend
    block = MixtralSparseMoeBlock(copy.deepcopy(cfg))
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w1_EDH.transpose(1, 2))  # [E, 2F, D]: gate; up
        block.experts.down_proj.copy_(layer.experts.w2_EFD.transpose(1, 2))  # [E, D, F]
    return block


def transformers_version() -> str | None:
    try:
        import transformers  # noqa: PLC0415

        return transformers.__version__
    except ImportError:
        return None


def check_match(ours, theirs, x_BSD: torch.Tensor, g_BSD: torch.Tensor, tol: float, min_frac: float) -> str:
    """Per token, the output and input-gradient differences relative to the output's scale; raises unless
    at least ``min_frac`` of the tokens are within ``tol`` (bf16: Mixtral's gate runs in bf16, ours in
    fp32 by design, so near-tied tokens may pick another expert). Returns 'matched/total, max rel diff'."""
    outs = []
    for fn in (lambda x: ours(x, RouterContext())[0], theirs):
        x = x_BSD.detach().clone().requires_grad_(True)
        out = fn(x)
        out.backward(g_BSD)
        outs.append((out.detach().float()[0], x.grad.float()[0]))
    ok_T = torch.ones(x_BSD.shape[1], dtype=torch.bool)
    worst = 0.0
    for a, b in zip(outs[0], outs[1], strict=True):
        rel_T = (a - b).abs().amax(-1) / b.abs().amax().clamp_min(1e-6)
        ok_T &= rel_T <= tol
        worst = max(worst, float(rel_T[rel_T <= tol].max()) if bool((rel_T <= tol).any()) else float("inf"))
    frac = float(ok_T.float().mean())
    if frac < min_frac:
        raise AssertionError(f"only {frac:.1%} of tokens match Mixtral's output and gradient within {tol}")
    return f"{int(ok_T.sum())}/{ok_T.numel()} tokens, max {worst:.1e}"


def mixtral_rows(args, device, rounds) -> list[dict]:
    rows = []
    T, E, k = (4096 if args.quick else 8192), 8, 2
    for dt_name, dtype in common.DTYPES.items():
        layer = ours_topk(E, k).to(device, dtype)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, T, D_MODEL, generator=g).to(device, dtype)
        grad = torch.randn(1, T, D_MODEL, generator=g).to(device, dtype)
        dense = MoELayer(D_MODEL, k * D_FF, "swiglu").to(device, dtype)
        fns = {
            "dense": _step(_layer_fn(dense), dense, x, grad),
            "evomoe": _step(_layer_fn(layer), layer, x, grad),
        }
        matched = {}
        for backend in ("eager", "grouped_mm"):
            block = mixtral_block(layer, backend)
            if block is None:
                continue
            block = block.to(device, dtype)
            tol, frac = (1e-4, 1.0) if dtype == torch.float32 else (5e-2, 0.95)
            matched[backend] = check_match(layer, block, x[:, :512], grad[:, :512], tol, frac)
            fns[f"mixtral-{backend}"] = _step(block, block, x, grad)
        res = common.interleaved(fns, device, rounds=rounds, warmup=1, baseline="dense")
        for name, r in res.items():
            rows.append(
                {
                    "dtype": dt_name,
                    "T": T,
                    "E": E,
                    "k": k,
                    "layer": name,
                    "ms": r["ms"],
                    "/ dense": r["ratio"],
                    "/ evomoe": r["ms"] / res["evomoe"]["ms"],
                    "evomoe / it": res["evomoe"]["ms"] / r["ms"],
                    "matches evomoe": matched.get(name.removeprefix("mixtral-"), "-"),
                }
            )
    return rows


def _layer_fn(layer: MoELayer):
    return lambda x_BSD: layer(x_BSD, RouterContext())[0]


def _step(fn, module, x, grad):
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        xr = x.detach().requires_grad_(True)
        fn(xr).backward(grad)

    return step


# ------------------------------------------------------------------------------------- [T, E, T] reference
def soft_gate(gate_w: torch.Tensor, x_TD: torch.Tensor, threshold: float):
    """DTS soft phase without noise (tau 1): selection y > threshold, combine weights softmax masked."""
    z = x_TD.float() @ gate_w.float().t()
    p = torch.softmax(z, -1)
    sel = p.detach() > threshold
    return p * sel, sel


def reference_dispatch_combine(x_TD: torch.Tensor, w_TE: torch.Tensor, experts_fn) -> torch.Tensor:
    """The reference code's dispatch: dense [T, E, T] combine (``diag_embed``), capacity T."""
    combine_TEC = torch.diag_embed(w_TE.t().to(x_TD.dtype)).permute(1, 0, 2)  # [t, e, c] = w[t, e] if c == t
    dispatch_TEC = (combine_TEC != 0).to(x_TD.dtype)
    x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)  # every expert receives all T slots
    y_ECD = experts_fn(x_ECD)
    return torch.einsum("tec,ecd->td", combine_TEC, y_ECD)


def reference_experts(layer: MoELayer):
    w1, w2 = layer.experts.w1_EDH, layer.experts.w2_EFD

    def run(x_ECD):
        h = torch.bmm(x_ECD, w1.to(x_ECD.dtype))
        gate, up = h.chunk(2, -1)
        return torch.bmm(F.silu(gate) * up, w2.to(x_ECD.dtype))

    return run


def ours_soft(E: int, threshold: float) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_FF, "swiglu")
    layer.experts = Experts(E, D_MODEL, D_FF, "swiglu")
    cfg = router_config(name="dts", gate_init="normal")
    cfg.dts.gumbel, cfg.dts.threshold = False, threshold
    layer.router = DTSRouter.from_config(cfg, D_MODEL, E)
    return layer


def soft_threshold(gate_w: torch.Tensor, x_TD: torch.Tensor, mean_k: float) -> float:
    with torch.no_grad():
        p = torch.softmax(x_TD.float() @ gate_w.t(), -1).flatten()
        return float(torch.topk(p, int(mean_k * x_TD.shape[0]) + 1).values[-1])


def reference_rows(args, device, rounds) -> list[dict]:
    E, mean_k = 16, 2.0
    Ts = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192]  # 8192 runs where memory allows
    free = _available_bytes(device)
    rows = []
    for T in Ts:
        rows += _reference_case(args, device, rounds, T, E, mean_k, free)
    return rows


def _reference_case(args, device, rounds: int, T: int, E: int, mean_k: float, free: float) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D_MODEL, generator=g).to(device)
    grad = torch.randn(T, D_MODEL, generator=g).to(device)
    probe = ours_soft(E, 0.0)
    thr = soft_threshold(probe.router.gate.weight.detach(), x, mean_k)
    layer = ours_soft(E, thr).to(device).train()
    ctx = RouterContext(gate=GateState(tau=1.0, hard=False))
    gate_w = layer.router.gate.weight

    def ours_layer(x_):
        return layer(x_.view(1, T, D_MODEL), ctx)[0].view(T, D_MODEL)

    def ref_layer(x_):
        w_TE, _ = soft_gate(gate_w, x_, thr)
        return reference_dispatch_combine(x_, w_TE, reference_experts(layer))

    def ours_dispatch(x_):
        routing = layer.router(x_, ctx)
        x_PD, _, state = LocalDispatcher().dispatch(x_, routing, E)
        return LocalDispatcher().combine(x_PD, state)

    def ref_dispatch(x_):
        w_TE, _ = soft_gate(gate_w, x_, thr)
        return reference_dispatch_combine(x_, w_TE, lambda x_ECD: x_ECD)

    # 4 [T, E, T] fp32 tensors live at the peak of the reference's dispatch + combine (+ backward)
    ref_dispatch_bytes = 4 * 4 * T * E * T
    ref_layer_bytes = ref_dispatch_bytes + 12 * 4 * E * T * 2 * D_FF
    with torch.no_grad():
        per_token = layer.router(x, ctx).token_idx_P.numel() / T
    if T <= 1024:
        for a, b in ((ours_layer, ref_layer), (ours_dispatch, ref_dispatch)):
            _assert_same(a, b, x, grad)
    for what, (ours_fn, ref_fn, need) in {
        "dispatch+combine": (ours_dispatch, ref_dispatch, ref_dispatch_bytes),
        "layer": (ours_layer, ref_layer, ref_layer_bytes),
    }.items():
        row = {"T": T, "E": E, "experts/token": round(per_token, 2), "part": what}
        fns = {"evomoe": _step(ours_fn, layer, x, grad)}
        fits = need < 0.6 * free
        if fits:
            fns["reference [T,E,T]"] = _step(ref_fn, layer, x, grad)
        n = 1 if (args.quick or T >= 4096) and fits else rounds
        res = common.interleaved(fns, device, rounds=n, warmup=1 if T < 4096 else 0)
        row["evomoe ms"] = res["evomoe"]["ms"]
        row["evomoe peak MiB"] = common.peak_bytes(fns["evomoe"], device) / 2**20
        if fits:
            row["reference ms"] = res["reference [T,E,T]"]["ms"]
            row["reference peak MiB"] = common.peak_bytes(fns["reference [T,E,T]"], device) / 2**20
            row["speedup"] = row["reference ms"] / row["evomoe ms"]
            row["memory ratio"] = row["reference peak MiB"] / max(row["evomoe peak MiB"], 1e-9)
        else:
            row["reference ms"] = f"skipped (needs ~{need / 2**30:.1f} GiB)"
        rows.append(row)
        print(row, flush=True)
    return rows


def _assert_same(a, b, x, grad):
    outs = []
    for fn in (a, b):
        xr = x.detach().clone().requires_grad_(True)
        out = fn(xr)
        out.backward(grad)
        outs.append((out.detach(), xr.grad))
    for u, v in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def _available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    args = p.parse_args()
    device = common.setup(args)
    rounds = args.rounds or (3 if args.quick else 5)
    version = transformers_version()
    if version is None:
        print("transformers is not installed (pip install -e .[bench]): the Mixtral comparison is skipped")
    mix = mixtral_rows(args, device, rounds)
    mix_table = common.print_table(
        mix,
        ["dtype", "T", "E", "k", "layer", "ms", "/ dense", "/ evomoe", "evomoe / it", "matches evomoe"],
        f"Same weights: evomoe vs transformers {version} Mixtral block (fwd+bwd), {device}",
    )
    ref = reference_rows(args, device, rounds)
    ref_table = common.print_table(
        ref,
        [
            "T",
            "E",
            "experts/token",
            "part",
            "evomoe ms",
            "reference ms",
            "speedup",
            "evomoe peak MiB",
            "reference peak MiB",
            "memory ratio",
        ],
        f"evomoe vs the EvoMoE reference formulation (dense [T, E, T] combine), fp32, {device}",
    )
    payload = {"transformers": version, "mixtral": mix, "reference": ref, "tables": [mix_table, ref_table]}
    common.write_json("peers", args, device, payload)


if __name__ == "__main__":
    main()
