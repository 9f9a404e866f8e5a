"""Sessa vs Transformer on the same budgets and data order.

Each architecture gets an approach-3 law L(N, D) with bootstrap refits. From a law, the
compute-optimal loss L*(C) = L(N*(C), D*(C)). The compute multiplier at budget C is how much more
compute the Transformer needs to reach Sessa's L*(C):  m(C) = C_T / C with L*_T(C_T) = L*_S(C)
(> 1: Sessa is ahead; infinite when Sessa's loss is below the Transformer's fitted floor E).
Intervals pair the i-th bootstrap refit of each arm (the arms are resampled independently).
Exponents differ significantly when the bootstrap interval of their difference excludes 0; the
two-sided bootstrap p-value is 2 x min(P(diff <= 0), P(diff >= 0)). Results are per sequence length.
"""
import math

import numpy as np

from .fit import Points, fit_approach3, law_optimum


def optimal_loss(law: dict, flops: float) -> float:
    return law_optimum(law, flops)["loss"]


def compute_multiplier(sessa: dict, transformer: dict, flops: float) -> float:
    """C_T / C such that the Transformer's compute-optimal loss at C_T equals Sessa's at C."""
    target = optimal_loss(sessa, flops)
    if target <= transformer["E"]:
        return math.inf
    lo, hi = math.log(flops) - 60.0, math.log(flops) + 60.0  # e^±60: far beyond any sweep
    if optimal_loss(transformer, math.exp(hi)) > target:
        return math.inf
    for _ in range(200):  # L*_T decreases in C: bisect on log C
        mid = 0.5 * (lo + hi)
        if optimal_loss(transformer, math.exp(mid)) > target:
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


def compare_laws(sessa_points: Points, transformer_points: Points, budgets: list[float], *, bootstrap: int = 200,
                 level: float = 0.95, seed: int = 0) -> dict:
    fits = {"sessa": fit_approach3(sessa_points, bootstrap=bootstrap, level=level, seed=seed),
            "transformer": fit_approach3(transformer_points, bootstrap=bootstrap, level=level, seed=seed + 1)}
    s_fit, t_fit = fits["sessa"], fits["transformer"]
    out = {"fits": {arch: {**f.params, "intervals": {k: f.intervals[k] for k in ("E", "A", "B", "alpha", "beta")}
                           if f.intervals else {}} for arch, f in fits.items()},
           "multiplier": [], "exponents": {}}
    pairs = list(zip(s_fit.samples, t_fit.samples))
    for budget in budgets:
        row = {"flops": budget, "multiplier": compute_multiplier(s_fit.params, t_fit.params, budget),
               "sessa_loss": optimal_loss(s_fit.params, budget), "transformer_loss": optimal_loss(t_fit.params, budget)}
        if pairs:
            row["interval"] = _interval([compute_multiplier(s, t, budget) for s, t in pairs], level)
        out["multiplier"].append(row)
    for name in ("alpha", "beta"):
        entry = {"sessa": s_fit.params[name], "transformer": t_fit.params[name],
                 "difference": s_fit.params[name] - t_fit.params[name]}
        if pairs:
            diffs = [s[name] - t[name] for s, t in pairs]
            entry["interval"] = _interval(diffs, level)
            entry["p_value"] = _p_value(diffs)
            entry["significant"] = not entry["interval"][0] <= 0 <= entry["interval"][1]
        out["exponents"][name] = entry
    out["level"], out["bootstrap"] = level, bootstrap
    return out, fits


def compare_table(rows: list[dict], budgets: list[float] | None = None, **kwargs) -> dict:
    """Per sequence length: the comparison of the fitted (post-cooldown, non-diverged) rows."""
    from .collect import fit_rows

    results = {}
    for seq_len in sorted({r["seq_len"] for r in rows}):
        arms = {}
        for arch in ("sessa", "transformer"):
            chosen = [r for r in fit_rows(rows, arch) if r["seq_len"] == seq_len]
            arms[arch] = Points([r["params"] for r in chosen], [r["tokens"] for r in chosen],
                                [r["loss_nats"] for r in chosen], [r["budget"] for r in chosen])
        if min(len(a) for a in arms.values()) < 6:
            results[seq_len] = {"error": f"each architecture needs >= 6 fitted points at seq_len {seq_len}, "
                                         f"got {[len(a) for a in arms.values()]}"}
            continue
        wanted = budgets or sorted({float(b) for b in arms["sessa"].budget})
        results[seq_len], _ = compare_laws(arms["sessa"], arms["transformer"], wanted, **kwargs)
    return results
