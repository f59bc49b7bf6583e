"""Does a candidate method pay for itself? The target check ``evomoe compare`` writes under its tables.

Two questions, read from the runs a compare already has (nothing is trained here):

1. **Speed to the reference's quality.** The candidate's steps and training FLOPs to reach the reference
   method's (Switch's) mean final validation loss, as ratios of the reference's own mean final steps and
   FLOPs. "To reach" is the first evaluation at or below the target (``compare.first_reach``), so the
   ratios are rounded up to the evaluation interval: a conservative reading for the candidate. Given the
   runs, the check adds a second reading: where the curve crosses the target, linearly between the last
   evaluation above it and the first at or below it (``crossing``).
2. **Better at equal FLOPs, beyond the seed noise.** For every other method, the candidate's mean
   validation loss at the equal-FLOPs point minus that method's, against a margin of two standard
   deviations of the seeds (the larger of the two methods' sample standard deviations). With one seed of
   either method there is no spread to compare with, and the check says so instead of passing.
"""

from __future__ import annotations


def crossing(evals: list[dict], target: float) -> tuple[float, float] | None:
    """(step, FLOPs) where the validation loss first reaches ``target``, linearly between the evaluation
    before and the first at or below it (that evaluation itself when it is the first); None if never."""
    for i, e in enumerate(evals):
        if e["val_loss"] <= target:
            if i == 0 or evals[i - 1]["val_loss"] == e["val_loss"]:
                return float(e["step"]), float(e["flops"])
            p = evals[i - 1]
            w = (p["val_loss"] - target) / (p["val_loss"] - e["val_loss"])
            return p["step"] + w * (e["step"] - p["step"]), p["flops"] + w * (e["flops"] - p["flops"])
    return None


def target_check(
    summary: dict, budgets: dict, candidate: str, reference: str = "switch", runs: dict | None = None
) -> dict | None:
    """The check as a dict (None when the candidate was not run); the speed part is None without a run of
    the reference method or when the candidate is the reference. ``runs`` (compare's per-method run
    summaries with their ``stats.evals``) adds the interpolated ratios."""
    methods, table = summary["methods"], budgets.get("methods", {})
    if candidate not in methods:
        return None
    ref = table.get(reference) if candidate != reference else None
    cand = methods[candidate]
    steps_ratio = flops_ratio = interp = None
    if ref is not None and cand["steps_to_target"] is not None:
        steps_ratio = cand["steps_to_target"] / ref["final_steps"]
        flops_ratio = cand["flops_to_target"] / ref["final_flops"]
        cross = [
            crossing(r["stats"]["evals"], summary["target_val_loss"]) for r in (runs or {}).get(candidate, [])
        ]
        if cross and None not in cross:
            mean = lambda i: sum(c[i] for c in cross) / len(cross)  # noqa: E731
            interp = (mean(0) / ref["final_steps"], mean(1) / ref["final_flops"])
    versus = {}
    c_at = (table.get(candidate) or {}).get("loss_at_flops")
    for m, row in table.items():
        if m == candidate or c_at is None or row["loss_at_flops"] is None:
            continue
        diff = c_at[0] - row["loss_at_flops"][0]
        one_seed = min(len(methods[candidate]["seeds"]), len(methods[m]["seeds"])) < 2
        margin = 2.0 * max(c_at[1], row["loss_at_flops"][1])
        versus[m] = {
            "diff": diff,
            "margin": None if one_seed else margin,
            "beyond": None if one_seed else diff < -margin,
        }
    return {
        "candidate": candidate,
        "reference": reference,
        "target_val_loss": summary["target_val_loss"],
        "flops": budgets.get("flops"),
        "steps_ratio": steps_ratio,
        "flops_ratio": flops_ratio,
        "interpolated_ratios": interp,
        "versus": versus,
        "below_all_beyond_noise": bool(versus) and all(v["beyond"] for v in versus.values()),
    }


def check_lines(check: dict | None) -> list[str]:
    """The check as markdown."""
    if check is None:
        return []
    c, r = check["candidate"], check["reference"]
    if check["target_val_loss"] is None or c == r:
        reach = f"No {r} run besides {c}: no target to reach."
    elif check["steps_ratio"] is None:
        target = check["target_val_loss"]
        reach = f"{c} does not reach {r}'s final validation loss ({target:.4f}) in its runs."
    else:
        reach = (
            f"{c} reaches {r}'s final validation loss ({check['target_val_loss']:.4f}) in "
            f"**{check['steps_ratio']:.2f}x** {r}'s steps and **{check['flops_ratio']:.2f}x** its training "
            "FLOPs (first evaluation at or below it; means over seeds)."
        )
        if check.get("interpolated_ratios"):
            s, f = check["interpolated_ratios"]
            reach += f" Linearly between the evaluations around the crossing: {s:.2f}x and {f:.2f}x."
    lines = ["", f"## Target check: {c}", "", reach, ""]
    if not check["versus"]:
        return lines
    lines += [
        f"At equal FLOPs ({check['flops']:.3g}): {c}'s mean validation loss minus each method's, against "
        "two standard deviations of the seeds (the larger of the two methods').",
        "",
        f"| {c} vs | difference | 2 std | below beyond 2 std |",
        "|---|---|---|---|",
    ]
    for m, v in check["versus"].items():
        margin = "n/a (one seed)" if v["margin"] is None else f"{v['margin']:.4f}"
        beyond = "n/a" if v["beyond"] is None else ("yes" if v["beyond"] else "no")
        lines.append(f"| {m} | {v['diff']:+.4f} | {margin} | {beyond} |")
    return lines
