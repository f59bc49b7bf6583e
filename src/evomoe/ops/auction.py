"""Balanced assignment of tokens to experts (BASE layers): auction prices, an exact finish, and a twin.

Problem: maximise sum_t a[t, e(t)] over maps t -> e(t) such that expert e receives exactly cap_e tokens.
Capacities (``balanced_capacities``): every expert gets T // E tokens and the first T % E experts one more,
so when E divides T each expert gets exactly T / E; otherwise loads differ by at most one and the extra
tokens always go to the lowest-numbered experts.

Two stages (``balanced_assignment``):
1. Auction (Bertsekas; Jacobi-parallel, forward), only to find good prices: tokens are the bidders,
   experts hold cap_e identical slots and carry one price p_e. Every unassigned token bids for its best
   expert under a[t, e] - p_e, raising the price by (best value - second value) + eps; each expert keeps
   its cap_e highest bids. Most tokens settle in a few rounds, but the last few take hundreds (measured
   with eps = 1e-3 of the range: 482 rounds at T 8192 / E 64), so the auction stops when a round places
   less than a tenth of the tokens still unassigned, when at most E are left, or after ``max_iters``.
2. Exact finish (``exact_finish``, successive shortest paths on the E experts): every token takes its
   best expert under the prices (complementary slackness holds exactly; loads are off by a little), then
   one token at a time moves along a shortest path of reduced costs from an overloaded expert to one with
   room, and the prices change so that slackness still holds. Once no expert is overloaded the prices
   prove optimality by LP duality: ``duality_gap`` is 0 up to float64 rounding. A move costs a
   Bellman-Ford pass on E nodes plus the rows of the experts on its path; the number of moves is the
   overload the prices leave (measured 50-70 at T 8192 / E 64 after the auction's first rounds).
Nothing falls back to a heuristic: the result is always balanced and optimal, whatever ``max_iters``.

Legend: T tokens, E experts, A experts with room (capacity > 0), N tokens of one expert. No gradient.
"""

from __future__ import annotations

import math

import torch


def balanced_capacities(
    num_tokens: int, num_experts: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """[E] long: T // E for every expert, plus one for the first T % E experts; sums to T."""
    base, extra = divmod(num_tokens, num_experts)
    cap_E = torch.full((num_experts,), base, dtype=torch.long, device=device)
    cap_E[:extra] += 1
    return cap_E


def default_eps(scores_TE: torch.Tensor) -> float:
    """A target eps from the scores' scale: 1e-3 of their range (1e-6 if all scores are equal)."""
    spread = float(scores_TE.max() - scores_TE.min()) if scores_TE.numel() else 0.0
    return max(spread * 1e-3, 1e-6)


def _rank_within_expert(expert_T: torch.Tensor, bid_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each token in its expert's queue ordered by bid, highest first (ties: lower index)."""
    order = torch.argsort(bid_T, descending=True, stable=True)
    order = order[torch.argsort(expert_T[order], stable=True)]
    counts_E = torch.bincount(expert_T, minlength=num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted = torch.arange(expert_T.numel(), device=expert_T.device) - start_E[expert_T[order]]
    pos_T = torch.empty_like(pos_sorted)
    pos_T[order] = pos_sorted
    return pos_T


def _auction_round(a_TE, price_E, owner_T, held_T, cap_E, eps):
    """One Jacobi round: every free token bids, every expert keeps its cap_e best bids, prices update."""
    E = a_TE.shape[1]
    free_T = owner_T < 0
    top_v, top_i = (a_TE - price_E).topk(2, dim=1)
    best_T = top_i[:, 0]
    bid_T = price_E[best_T] + (top_v[:, 0] - top_v[:, 1]) + eps
    cand_T = torch.where(free_T, best_T, owner_T)
    cand_bid_T = torch.where(free_T, bid_T, held_T)
    keep_T = _rank_within_expert(cand_T, cand_bid_T, E) < cap_E[cand_T]
    owner_T = torch.where(keep_T, cand_T, torch.full_like(cand_T, -1))
    held_T = torch.where(keep_T, cand_bid_T, held_T)
    return owner_T, held_T, _prices(price_E, owner_T, held_T, cap_E)


def _prices(price_E, owner_T, held_T, cap_E):
    """Full experts: price = max(old price, lowest held bid); others keep their price."""
    assigned_T = owner_T >= 0
    idx_T = owner_T.clamp_min(0)
    n_E = torch.bincount(idx_T[assigned_T], minlength=cap_E.numel())
    inf = torch.full_like(held_T, math.inf)
    low_E = torch.full_like(price_E, math.inf).scatter_reduce(
        0, idx_T, torch.where(assigned_T, held_T, inf), "amin"
    )
    return torch.where(n_E >= cap_E, torch.maximum(price_E, low_E), price_E)


def _keep_eps_cs(a_TE, price_E, owner_T, held_T, eps):
    """At a new eps: unassign tokens violating eps-CS; the others hold a bid equal to their expert's price."""
    assigned_T = owner_T >= 0
    v_TE = a_TE - price_E
    own_v_T = v_TE.gather(1, owner_T.clamp_min(0).unsqueeze(1)).squeeze(1)
    ok_T = assigned_T & (own_v_T >= v_TE.max(1).values - eps)
    owner_T = torch.where(ok_T, owner_T, torch.full_like(owner_T, -1))
    held_T = torch.where(ok_T, price_E[owner_T.clamp_min(0)], held_T)
    return owner_T, held_T


@torch.no_grad()
def balanced_assignment(
    scores_TE: torch.Tensor,
    capacity_E: torch.Tensor | None = None,
    eps: float = 0.0,
    max_iters: int = 200,
    eps_scaling: float = 0.0,
) -> torch.Tensor:
    """Expert of each token ([T] long), maximising the total score with ``capacity_E[e]`` tokens per expert.

    scores_TE: [T, E] affinities (any float dtype; solved in float64; non-finite scores count as 0).
    capacity_E: [E] long summing to T; default ``balanced_capacities(T, E)``.
    eps: the auction's bid increment; 0 picks ``default_eps``. It only affects speed: the result is exact.
    max_iters: at most this many auction rounds before the exact finish.
    eps_scaling: factor by which the auction's eps shrinks between phases, starting from the scores'
        range / 4; values <= 1 (the default) disable scaling. Measured slower (3-10x more rounds).
    """
    return solve_balanced(scores_TE, capacity_E, eps, max_iters, eps_scaling)[0]


def solve_balanced(
    scores_TE: torch.Tensor,
    capacity_E: torch.Tensor | None = None,
    eps: float = 0.0,
    max_iters: int = 200,
    eps_scaling: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``balanced_assignment`` plus the prices that certify it (``duality_gap``): (expert_T, price_E)."""
    T, E = scores_TE.shape
    device = scores_TE.device
    a_TE = scores_TE.detach().to(torch.float64)
    a_TE = torch.where(torch.isfinite(a_TE), a_TE, torch.zeros_like(a_TE))
    cap_E = balanced_capacities(T, E, device) if capacity_E is None else capacity_E.to(device, torch.long)
    if int(cap_E.sum()) != T or bool((cap_E < 0).any()):
        raise ValueError(f"capacity_E must be >= 0 and sum to T={T}, got {cap_E.tolist()}")
    owner_T = torch.full((T,), -1, dtype=torch.long, device=device)
    price_E = a_TE.new_zeros(E)
    if T == 0:
        return owner_T, price_E
    active_E = (cap_E > 0).nonzero().squeeze(1)
    if active_E.numel() == 1:
        return owner_T.fill_(int(active_E[0])), price_E
    a_TA, cap_A = a_TE[:, active_E], cap_E[active_E]
    price_A = solve_auction(a_TA, cap_A, eps or default_eps(a_TA), max_iters, eps_scaling)
    sub_T, price_A = exact_finish(a_TA, price_A, cap_A)
    # experts without room: a price at which no token prefers them, so that the certificate stays tight
    best_T = (a_TA - price_A).max(1).values
    price_E = (a_TE - best_T.unsqueeze(1)).max(0).values.clamp_min(0)
    return active_E[sub_T], price_E.index_copy(0, active_E, price_A)


def eps_schedule(a_TE: torch.Tensor, eps: float, scaling: float) -> list[float]:
    """Decreasing eps values ending at ``eps``: range/4, range/4/scaling, ... (one value without scaling)."""
    if scaling <= 1.0:
        return [eps]
    out, e = [], float(a_TE.max() - a_TE.min()) / 4
    while e > eps:
        out.append(e)
        e /= scaling
    return out + [eps]


def solve_auction(a_TE, cap_E, eps: float, max_iters: int, eps_scaling: float) -> torch.Tensor:
    """The auction on experts that all have room (E >= 2); returns its prices price_E (module docstring).

    A phase ends when every token is placed, when at most E are left, or when a round placed less than a
    tenth of those left (the slow tail, which the exact finish does in far less time)."""
    T, E = a_TE.shape
    price_E = a_TE.new_zeros(E)
    owner_T = torch.full((T,), -1, dtype=torch.long, device=a_TE.device)
    held_T = a_TE.new_zeros(T)
    rounds = 0
    for phase_eps in eps_schedule(a_TE, eps, eps_scaling):
        owner_T, held_T = _keep_eps_cs(a_TE, price_E, owner_T, held_T, phase_eps)
        price_E = _prices(price_E, owner_T, held_T, cap_E)
        before, left = math.inf, int((owner_T < 0).sum())
        while rounds < max_iters and left > E and 10 * (before - left) >= before:
            owner_T, held_T, price_E = _auction_round(a_TE, price_E, owner_T, held_T, cap_E, phase_eps)
            before, left = left, int((owner_T < 0).sum())
            rounds += 1
        if rounds >= max_iters:
            break
    return price_E


def _move_costs(a_TE, price_E, owner_T, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row e of the expert graph: the cheapest reduced cost of moving one of e's tokens to each expert j,
    (a[t, e] - p_e) - (a[t, j] - p_j) >= 0, and that token ([E] each; +inf where e holds no token)."""
    E = a_TE.shape[1]
    tok_N = (owner_T == e).nonzero().squeeze(1)
    if tok_N.numel() == 0:
        return a_TE.new_full((E,), math.inf), torch.zeros(E, dtype=torch.long, device=a_TE.device)
    v_NE = a_TE.index_select(0, tok_N) - price_E
    r_NE = v_NE[:, e : e + 1] - v_NE
    r_NE[:, e] = math.inf
    cost_E, k_E = r_NE.min(0)
    return cost_E.clamp_min(0), tok_N[k_E]


def _shortest_paths(cost_EE: torch.Tensor, source_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bellman-Ford from all sources at once, non-negative edge costs: (dist_E, pred_E; -1 at sources)."""
    E = cost_EE.shape[0]
    dist_E = torch.where(source_E, 0.0, math.inf).to(cost_EE.dtype)
    pred_E = torch.full((E,), -1, dtype=torch.long, device=cost_EE.device)
    for _ in range(E):
        cand_E, arg_E = (dist_E.unsqueeze(1) + cost_EE).min(0)
        better_E = cand_E < dist_E
        if not bool(better_E.any()):
            break
        dist_E = torch.where(better_E, cand_E, dist_E)
        pred_E = torch.where(better_E, arg_E, pred_E)
    return dist_E, pred_E


def exact_finish(a_TE, price_E, cap_E) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal balanced assignment from any prices: successive shortest paths (module docstring, stage 2).

    Invariant: every token sits on its best expert under a - p (exact complementary slackness).
    Returns (expert_T, price_E); ``duality_gap`` of the two is 0 up to rounding.
    """
    T, E = a_TE.shape
    owner_T = (a_TE - price_E).argmax(1)
    rows = [_move_costs(a_TE, price_E, owner_T, e) for e in range(E)]
    cost_EE, token_EE = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    load_E = torch.bincount(owner_T, minlength=E)
    for _ in range(T + 1):
        over_E = load_E > cap_E
        if not bool(over_E.any()):
            return owner_T, price_E
        dist_E, pred_E = _shortest_paths(cost_EE, over_E)
        sink = int(dist_E.masked_fill(load_E >= cap_E, math.inf).argmin())
        cut_E = dist_E.clamp_max(dist_E[sink])
        price_E = price_E - cut_E + dist_E[sink]  # the path's edges get reduced cost 0, none gets < 0
        cost_EE = (cost_EE + cut_E.unsqueeze(1) - cut_E.unsqueeze(0)).clamp_min(0)
        path = [sink]
        while not bool(over_E[path[-1]]) and len(path) <= E:
            path.append(int(pred_E[path[-1]]))
        for dst, src in zip(path[:-1], path[1:], strict=True):
            owner_T[token_EE[src, dst]] = dst
        load_E[sink] += 1
        load_E[path[-1]] -= 1
        for e in path:
            cost_EE[e], token_EE[e] = _move_costs(a_TE, price_E, owner_T, e)
    raise AssertionError("exact_finish: more moves than tokens")  # each move removes one unit of overload


def duality_gap(scores_TE: torch.Tensor, capacity_E: torch.Tensor, expert_T: torch.Tensor, price_E) -> float:
    """Upper bound on (optimum - score of expert_T): LP weak duality, for any prices and any feasible
    assignment. sum_t max_e (a[t, e] - p_e) + sum_e cap_e p_e >= the optimum, whatever p is."""
    a_TE = scores_TE.detach().double()
    p_E = price_E.double()
    dual = float((a_TE - p_E).max(1).values.sum() + (capacity_E.double() * p_E).sum())
    return dual - assignment_score(a_TE, expert_T)


def assignment_score(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> float:
    """Total score of an assignment."""
    return float(scores_TE.gather(1, expert_T.unsqueeze(1)).sum())


def balanced_assignment_reference(
    scores_TE: torch.Tensor, capacity_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact slow twin: the Hungarian algorithm on the [T, T] token x slot matrix (tiny T only)."""
    T, E = scores_TE.shape
    cap_E = balanced_capacities(T, E) if capacity_E is None else capacity_E.cpu().long()
    slot_expert = [e for e in range(E) for _ in range(int(cap_E[e]))]
    if len(slot_expert) != T:
        raise ValueError(f"capacity_E must sum to T={T}, got {cap_E.tolist()}")
    rows = scores_TE.detach().double().cpu().tolist()
    cost = [[-rows[t][e] for e in slot_expert] for t in range(T)]
    slot_of_token = hungarian_min(cost)
    return torch.tensor([slot_expert[s] for s in slot_of_token], dtype=torch.long, device=scores_TE.device)


def hungarian_min(cost: list[list[float]]) -> list[int]:
    """Minimum-cost perfect matching of a square matrix (shortest augmenting paths, O(n^3)): row -> column."""
    n = len(cost)
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match_col = [0] * (n + 1)  # column j (1-based) -> row (1-based), 0: free
    way = [0] * (n + 1)
    for i in range(1, n + 1):
        match_col[0], j0 = i, 0
        minv, used = [math.inf] * (n + 1), [False] * (n + 1)
        while match_col[j0] != 0:
            used[j0], i0, delta, j1 = True, match_col[j0], math.inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match_col[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:
            j1 = way[j0]
            match_col[j0] = match_col[j1]
            j0 = j1
    row_to_col = [0] * n
    for j in range(1, n + 1):
        row_to_col[match_col[j] - 1] = j - 1
    return row_to_col
