"""The BASE router's balanced assignment per step, against the MoE layer it routes for (fwd + bwd).

    python benchmarks/auction.py [--quick] [--threads N] [--rounds N]

For T tokens and E experts (random affinities, and BASE's own at initialisation: layer-normed x times
orthogonal centroids of gain 0.1), timed interleaved in one process (see common.py):
- ``assign``: ``balanced_assignment`` as the router calls it (auction prices, then the exact finish);
- ``layer``: the MoE layer with the BASE router, forward + backward, D 256, expert F 512 (GELU), fp32;
- ``auction_only``: the auction alone run to convergence (what BASE used to need; no exact finish).
Printed: the auction rounds ``assign`` ran and the moves its exact finish made, assign / layer and
auction_only / assign (medians of per-round ratios), the rounds the auction alone needs to converge,
and the certified gap of ``assign`` (``duality_gap``: an upper bound on optimum - score; 0 = optimal).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets up the import path of evomoe)
import torch  # noqa: E402
from evomoe.moe.routers.base import BaseLayerRouter  # noqa: E402
from evomoe.moe.routing import GateState, RouterContext  # noqa: E402

from evomoe.config import RouterConfig  # noqa: E402
from evomoe.moe.experts import Experts  # noqa: E402
from evomoe.moe.layer import MoELayer  # noqa: E402
from evomoe.ops import auction  # noqa: E402

D_MODEL, D_FF = 256, 512


def affinities(T: int, E: int, kind: str, layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    if kind == "random":
        return torch.randn(T, E, generator=torch.Generator().manual_seed(T + E), dtype=torch.float64)
    with torch.no_grad():
        return layer.router.centroids(x_TD).double()


def auction_to_convergence(a_TE: torch.Tensor) -> int:
    """Rounds the auction alone needs until every token is placed (at the default eps)."""
    T, E = a_TE.shape
    cap_E, eps = auction.balanced_capacities(T, E), auction.default_eps(a_TE)
    price_E, held_T = a_TE.new_zeros(E), a_TE.new_zeros(T)
    owner_T = torch.full((T,), -1, dtype=torch.long)
    rounds = 0
    while bool((owner_T < 0).any()):
        owner_T, held_T, price_E = auction._auction_round(a_TE, price_E, owner_T, held_T, cap_E, eps)
        rounds += 1
    return rounds


def rounds_and_moves(a_TE: torch.Tensor) -> tuple[int, int]:
    """What ``balanced_assignment`` does: auction rounds it ran, and moves left for the exact finish."""
    T, E = a_TE.shape
    cap_E, calls, real = auction.balanced_capacities(T, E), [0], auction._auction_round

    def counted(*args):
        calls[0] += 1
        return real(*args)

    auction._auction_round = counted
    try:
        price_E = auction.solve_auction(a_TE, cap_E, auction.default_eps(a_TE), 200, 0.0)
    finally:
        auction._auction_round = real
    load_E = torch.bincount((a_TE - price_E).argmax(1), minlength=E)
    return calls[0], int((load_E - cap_E).clamp_min(0).sum())


def base_layer(E: int) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_FF, "gelu", "auto")
    layer.experts = Experts(E, D_MODEL, D_FF, "gelu", "auto")
    layer.router = BaseLayerRouter(D_MODEL, E, RouterConfig(name="base"))
    return layer.train()


def case(T: int, E: int, kind: str, rounds: int, device: torch.device) -> dict:
    layer = base_layer(E)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.nn.functional.layer_norm(torch.randn(T, D_MODEL, generator=g), (D_MODEL,))
    a_TE = affinities(T, E, kind, layer, x_TD)
    ctx = RouterContext(gate=GateState(), shape=(1, T))
    x_BSD = x_TD.view(1, T, D_MODEL).requires_grad_(True)

    def fwd_bwd():
        layer(x_BSD, ctx)[0].sum().backward()

    fns = {
        "layer": fwd_bwd,
        "assign": lambda: auction.balanced_assignment(a_TE),
        "auction_only": lambda: auction_to_convergence(a_TE),
    }
    t = common.interleaved(fns, device, rounds=rounds, baseline="assign")
    got, price = auction.solve_balanced(a_TE)
    gap = auction.duality_gap(a_TE, auction.balanced_capacities(T, E), got, price)
    rounds, moves = rounds_and_moves(a_TE)
    return {
        "T": T,
        "E": E,
        "scores": kind,
        "rounds": rounds,
        "moves": moves,
        "assign ms": t["assign"]["ms"],
        "layer ms": t["layer"]["ms"],
        "assign / layer": 1 / t["layer"]["ratio"],
        "auction-only rounds": auction_to_convergence(a_TE),
        "auction-only / assign": t["auction_only"]["ratio"],
        "gap": gap,
        "spread": t["layer"]["spread"],
        "loadavg": common.loadavg(),
    }


def main() -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    device = common.setup(args)
    grid = [(4096, 16), (8192, 64)] if args.quick else [(2048, 8), (4096, 16), (8192, 64)]
    rows = [case(T, E, kind, args.rounds or 3, device) for T, E in grid for kind in ("random", "init")]
    cols = list(rows[0])
    title = f"BASE balanced assignment vs the MoE layer fwd+bwd, {torch.get_num_threads()} threads"
    common.print_table(rows, cols, title)
    common.write_json("auction", args, device, {"rows": rows})


if __name__ == "__main__":
    main()
