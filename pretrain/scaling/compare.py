"""Each arm (Sessa, a layer pattern, ...) vs a baseline arm (the Transformer by default) on the same
budgets and data order.

Each arm gets an approach-3 law L(N, D) with bootstrap refits. From a law, the compute-optimal loss
L*(C) = L(N*(C), D*(C)). The compute multiplier at budget C is how much more compute the baseline
needs to reach the arm's L*(C):  m(C) = C_B / C with L*_B(C_B) = L*_A(C)
(> 1: the arm is ahead; infinite when the arm's loss is below the baseline's fitted floor E).
Intervals pair the i-th bootstrap refit of each arm (the arms are resampled independently).
Exponents differ significantly when the bootstrap interval of their difference excludes 0; the
two-sided bootstrap p-value is 2 x min(P(diff <= 0), P(diff >= 0)). Results are per sequence length.
"""
import math

import numpy as np

from .fit import Points, fit_approach3, law_optimum


def optimal_loss(law: dict, flops: float) -> float:
    return law_optimum(law, flops)["loss"]


def compute_multiplier(arm: dict, baseline: dict, flops: float) -> float:
    """C_B / C such that the baseline's compute-optimal loss at C_B equals the arm's at C."""
    target = optimal_loss(arm, flops)
    if target <= baseline["E"]:
        return math.inf
    lo, hi = math.log(flops) - 60.0, math.log(flops) + 60.0  # e^±60: far beyond any sweep
    if optimal_loss(baseline, math.exp(hi)) > target:
        return math.inf
    for _ in range(200):  # L*_B decreases in C: bisect on log C
        mid = 0.5 * (lo + hi)
        if optimal_loss(baseline, math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi)) / flops


def _interval(values, level):
    values = np.asarray(values, float)  # may hold inf (Sessa below the Transformer's floor): no interpolation
    return [float(np.percentile(values, 50 * (1 - level), method="nearest")),
            float(np.percentile(values, 50 * (1 + level), method="nearest"))]


def _p_value(diffs) -> float:
    diffs = np.asarray(diffs, float)
    return float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))


def compare_laws(arm_points: Points, baseline_points: Points, budgets: list[float], *, bootstrap: int = 200,
                 level: float = 0.95, seed: int = 0, names: tuple[str, str] = ("sessa", "transformer")) -> dict:
    """The arm's law against the baseline's; results keyed by `names` (arm, baseline)."""
    arm, baseline = names
    fits = {arm: fit_approach3(arm_points, bootstrap=bootstrap, level=level, seed=seed),
            baseline: fit_approach3(baseline_points, bootstrap=bootstrap, level=level, seed=seed + 1)}
    s_fit, t_fit = fits[arm], fits[baseline]
    out = {"fits": {arch: {**f.params, "intervals": {k: f.intervals[k] for k in ("E", "A", "B", "alpha", "beta")}
                           if f.intervals else {}} for arch, f in fits.items()},
           "multiplier": [], "exponents": {}}
    pairs = list(zip(s_fit.samples, t_fit.samples))
    for budget in budgets:
        row = {"flops": budget, "multiplier": compute_multiplier(s_fit.params, t_fit.params, budget),
               f"{arm}_loss": optimal_loss(s_fit.params, budget), f"{baseline}_loss": optimal_loss(t_fit.params, budget)}
        if pairs:
            row["interval"] = _interval([compute_multiplier(s, t, budget) for s, t in pairs], level)
        out["multiplier"].append(row)
    for name in ("alpha", "beta"):
        entry = {arm: s_fit.params[name], baseline: t_fit.params[name],
                 "difference": s_fit.params[name] - t_fit.params[name]}
        if pairs:
            diffs = [s[name] - t[name] for s, t in pairs]
            entry["interval"] = _interval(diffs, level)
            entry["p_value"] = _p_value(diffs)
            entry["significant"] = not entry["interval"][0] <= 0 <= entry["interval"][1]
        out["exponents"][name] = entry
    out["level"], out["bootstrap"], out["arm"], out["baseline"] = level, bootstrap, arm, baseline
    return out, fits


def compare_table(rows: list[dict], budgets: list[float] | None = None, baseline: str = "transformer",
                  **kwargs) -> dict:
    """Per sequence length, per arm other than `baseline`: the comparison of the fitted
    (post-cooldown, non-diverged) rows, {seq_len: {arm: result or {"error": ...}}}."""
    from .collect import fit_rows

    results = {}
    for seq_len in sorted({r["seq_len"] for r in rows}):
        points = {}
        for arm in sorted({r["arch"] for r in rows} | {baseline}):
            chosen = [r for r in fit_rows(rows, arm) if r["seq_len"] == seq_len]
            points[arm] = Points([r["params"] for r in chosen], [r["tokens"] for r in chosen],
                                 [r["loss_nats"] for r in chosen], [r["budget"] for r in chosen])
        results[seq_len] = {}
        for arm in (a for a in points if a != baseline):
            counts = {arm: len(points[arm]), baseline: len(points[baseline])}
            if min(counts.values()) < 6:
                results[seq_len][arm] = {"error": f"each arm needs >= 6 fitted points at seq_len {seq_len}, got {counts}",
                                         "arm": arm, "baseline": baseline}
                continue
            wanted = budgets or sorted({float(b) for b in points[arm].budget})
            results[seq_len][arm], _ = compare_laws(points[arm], points[baseline], wanted, names=(arm, baseline),
                                                    **kwargs)
    return results
