"""The evomoe MoE layer (forward + backward) against the iso-FLOP dense FFN, per dtype, T, E, k and load.

    python benchmarks/layer.py [--quick] [--threads N] [--impls auto,grouped]

Yardstick: the dense FFN whose hidden width is k x the expert width (for the DTS soft phase: the measured
mean experts per token x the expert width), the same dtype (weights and activations), the same tokens,
timed interleaved in the same process (see common.py). A ratio below 1 means the MoE layer, router and
dispatch included, is faster than the dense FFN that does the same expert arithmetic.
Loads: ``balanced`` (top-k of a random gate), ``zipf`` (the gate's logits biased by log of a Zipf(1.2)
distribution over experts), ``dts-m`` (the DTS gate in its soft phase, threshold set for a mean of m
experts per token). Targets (issue): balanced k <= 2, E <= 64: ratio <= 1.0; DTS: ratio <= 1.1.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets up the import path of evomoe)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from evomoe.config import router_config  # noqa: E402
from evomoe.moe.experts import Experts  # noqa: E402
from evomoe.moe.layer import MoELayer  # noqa: E402
from evomoe.moe.router import GateState, RouterContext  # noqa: E402
from evomoe.moe.routers.dts import DTSRouter  # noqa: E402
from evomoe.moe.routers.gate import gumbel_like  # noqa: E402
from evomoe.moe.routers.topk import TopKRouter  # noqa: E402

D_MODEL, D_FF, ACTIVATION = 512, 1024, "swiglu"


class BiasedGate(nn.Module):
    """A router's gate plus a fixed bias on the logits (a skewed expert load)."""

    def __init__(self, gate: nn.Module, bias_E: torch.Tensor) -> None:
        super().__init__()
        self.inner = gate
        self.register_buffer("bias_E", bias_E)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.inner(x_TD) + self.bias_E


def zipf_bias(E: int, s: float = 1.2) -> torch.Tensor:
    return -s * torch.log(torch.arange(1, E + 1, dtype=torch.float32))


def moe_layer(E: int, load: str, k: int, impl: str, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D_MODEL, D_FF, ACTIVATION, impl)
    layer.experts = Experts(E, D_MODEL, D_FF, ACTIVATION, impl)
    cfg = router_config(name="dts" if load.startswith("dts") else "topk", gate_init="normal")
    if load.startswith("dts"):
        layer.router = DTSRouter.from_config(cfg, D_MODEL, E)
    else:
        cfg.topk.k = k
        layer.router = TopKRouter.from_config(cfg, D_MODEL, E)
        if load == "zipf":
            layer.router.gate = BiasedGate(layer.router.gate, zipf_bias(E))
    return layer


def calibrate_dts(layer: MoELayer, x_TD: torch.Tensor, mean_k: float, tau: float = 1.0) -> None:
    """Set the DTS threshold so that the soft phase selects ``mean_k`` experts per token on average."""
    with torch.no_grad():
        z = layer.router.gate(x_TD.float())
        y = torch.softmax((z + gumbel_like(z)) / tau, -1).flatten()
        n = int(round(mean_k * x_TD.shape[0]))
        layer.router.cfg.threshold = float(torch.topk(y, n + 1).values[-1])


def dense_ffn(width: int) -> MoELayer:
    """The project's dense FFN (an MoE layer before the spawn): x W1 -> act -> W2, hidden ``width``."""
    torch.manual_seed(1)
    return MoELayer(D_MODEL, width, ACTIVATION, "auto")


def step_fn(layer: nn.Module, x_BSD: torch.Tensor, g_BSD: torch.Tensor, ctx: RouterContext):
    params = list(layer.parameters())

    def step():
        for p in params:
            p.grad = None
        out, _, stats = layer(x_BSD, ctx)
        out.backward(g_BSD)
        return stats

    return step


def run_case(case: dict, device: torch.device, rounds: int, impls: list[str]) -> dict:
    dtype, T, E, k, load = common.DTYPES[case["dtype"]], case["T"], case["E"], case["k"], case["load"]
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(1, T, D_MODEL, generator=g).to(device, dtype).requires_grad_(True)
    grad = torch.randn(1, T, D_MODEL, generator=g).to(device, dtype)
    ctx = RouterContext(gate=GateState(tau=1.0, hard=False))
    layers = {}
    for impl in impls:
        layer = moe_layer(E, load, k, impl).to(device, dtype).train()
        if load.startswith("dts"):
            calibrate_dts(layer, x.detach().view(T, D_MODEL), case["mean_k"])
        layers[impl] = layer
    first = layers[impls[0]]
    with torch.no_grad():
        stats = first(x, ctx)[2]
    per_token = float(stats.pairs) / T
    counts = stats.counts_E.float()
    width = max(8, int(round(per_token * D_FF / 8)) * 8) if load.startswith("dts") else k * D_FF
    dense = dense_ffn(width).to(device, dtype)
    fns = {"dense": step_fn(dense, x, grad, ctx)}
    fns.update({f"moe:{i}": step_fn(m, x, grad, ctx) for i, m in layers.items()})
    load0 = common.loadavg()
    res = common.interleaved(fns, device, rounds=rounds, warmup=1, baseline="dense")
    row = {
        "dtype": case["dtype"],
        "T": T,
        "E": E,
        "k": k if not load.startswith("dts") else f"~{per_token:.2f}",
        "load": load,
        "max/mean load": round(float(counts.max() / counts.mean().clamp_min(1e-9)), 2),
        "impl": first.experts.choose_impl(x.detach().view(T, D_MODEL)),
        "dense ms": res["dense"]["ms"],
    }
    for i in impls:
        r = res[f"moe:{i}"]
        suffix = "" if i == impls[0] else f" ({i})"
        row[f"moe ms{suffix}"] = r["ms"]
        row[f"ratio{suffix}"] = r["ratio"]
        row[f"cpu ratio{suffix}"] = r["cpu_ratio"]
        row[f"spread{suffix}"] = r["spread"]
    row["loadavg"] = f"{load0:.1f}-{common.loadavg():.1f}"
    target = case.get("target")
    row["target"] = "-" if target is None else f"<={target}"
    row["met"] = "-" if target is None else ("yes" if row["ratio"] <= target else "no")
    return row


def cases(
    quick: bool, dtypes: list[str], Ts: list[int] | None = None, Es: list[int] | None = None
) -> list[dict]:
    Ts = Ts or ([4096] if quick else [4096, 16384])
    Es = Es or ([8, 64] if quick else [8, 32, 64])
    out = []
    for dtype in dtypes:
        for T in Ts:
            for E in Es:
                for k in (1, 2):
                    out.append(dict(dtype=dtype, T=T, E=E, k=k, load="balanced", target=1.0))
            for m in [2] if quick else [2, 4]:
                out.append(dict(dtype=dtype, T=T, E=16, k=0, load=f"dts-{m}", mean_k=m, target=1.1))
            for E in [e for e in ([8] if quick else [8, 32]) if e in Es]:
                out.append(dict(dtype=dtype, T=T, E=E, k=2, load="zipf", target=None))
    return out


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--impls", default="auto", help="expert implementations to time (first: the headline)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--Ts", default="", help="token counts (default: 4096,16384; quick: 4096)")
    p.add_argument("--Es", default="", help="expert counts (default: 8,32,64; quick: 8,64)")
    args = p.parse_args()
    device = common.setup(args)
    rounds = args.rounds or (3 if args.quick else 5)
    impls = args.impls.split(",")
    rows = []
    columns = [
        "dtype",
        "T",
        "E",
        "k",
        "load",
        "max/mean load",
        "impl",
        "dense ms",
        "moe ms",
        "ratio",
        "cpu ratio",
    ]
    for i in impls[1:]:
        columns += [f"moe ms ({i})", f"ratio ({i})"]
    columns += ["spread", "loadavg", "target", "met"]
    Ts = [int(t) for t in args.Ts.split(",")] if args.Ts else None
    Es = [int(e) for e in args.Es.split(",")] if args.Es else None
    for case in cases(args.quick, args.dtypes.split(","), Ts, Es):
        rows.append(run_case(case, device, rounds, impls))
        print(" ".join(f"{c}={common.fmt(rows[-1].get(c, '-'))}" for c in columns), flush=True)
    table = common.print_table(rows, columns, f"MoE layer / iso-FLOP dense FFN (fwd+bwd), {device}")
    met = [r for r in rows if r["met"] != "-"]
    balanced = [r["ratio"] for r in rows if r["load"] == "balanced"]
    summary = {
        "targets_met": sum(r["met"] == "yes" for r in met),
        "targets_total": len(met),
        "geomean_ratio_balanced": math.exp(sum(map(math.log, balanced)) / len(balanced))
        if balanced
        else None,
    }
    print(summary)
    common.write_json(
        "layer", args, device, {"rows": rows, "summary": summary, "table": table, "rounds": rounds}
    )


if __name__ == "__main__":
    main()
