"""Scaling-law fits with bootstrap intervals: Chinchilla approaches 1, 2 and 3 (Hoffmann et al. 2022).

  approach 1  envelope: the points on the compute/loss Pareto front (lowest loss for their compute
              or less) give N*(C) and D*(C) by a power-law fit in log space.
  approach 2  isoFLOP: per budget, a parabola in log N through the losses of that budget's sizes;
              its vertex is N*(C). A budget whose parabola opens downwards (concave) or whose
              vertex or best point lies at the edge of the sampled sizes is rejected: its minimum
              is not bracketed, so it would bias the exponent. Then N* = k C^a across budgets.
  approach 3  L(N, D) = E + A / N^alpha + B / D^beta, fitted on log L with a Huber loss
              (delta 1e-3) by bounded L-BFGS-B from a grid of initialisations, in Chinchilla's
              parametrisation A = e^a, B = e^b, E = e^e (log L = LSE(a - alpha log N, b - beta log D, e)).
              The compute-optimal allocation for C = k N D (k = 6): N* = G (C/k)^(beta/(alpha+beta)),
              D* = (C/k) / N*, G = (alpha A / (beta B))^(1/(alpha+beta)).
Intervals come from a nonparametric bootstrap over points (approach 2: within each budget),
percentile method. `noise_floor` measures the loss spread between seeds of identical configs.

    python -m pretrain.scaling fit --points sweep.csv --approach 3 --json
"""
import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D, the budget convention of the allocations below
HUBER_DELTA = 1e-3
# Chinchilla's initialisation grid, thinned (the full one has 4500 points; these find the same optimum here).
INIT_GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0), "e": (-1.0, 0.0, 1.0),
             "alpha": (0.2, 0.5, 1.0), "beta": (0.2, 0.5, 1.0)}
BOUNDS = {"a": (-10.0, 40.0), "b": (-10.0, 40.0), "e": (-5.0, 5.0), "alpha": (1e-3, 3.0), "beta": (1e-3, 3.0)}


class FitError(ValueError):
    """Too few or unusable points for the requested fit."""


@dataclass
class Points:
    """Columns of a sweep's post-cooldown results (one row per (N, D) point)."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    budget: np.ndarray | None = None  # the planned compute budget of each point (isoFLOP groups)

    def __post_init__(self):
        self.params, self.tokens, self.loss = (np.asarray(x, dtype=float) for x in (self.params, self.tokens, self.loss))
        if self.budget is not None:
            self.budget = np.asarray(self.budget, dtype=float)
        if not (len(self.params) == len(self.tokens) == len(self.loss)):
            raise FitError("params, tokens and loss must have the same length")
        if len(self.params) and (min(self.params.min(), self.tokens.min(), self.loss.min()) <= 0):
            raise FitError("params, tokens and loss must all be positive")

    @property
    def flops(self) -> np.ndarray:
        return FLOPS_PER_PARAM_TOKEN * self.params * self.tokens

    def __len__(self):
        return len(self.params)

    def take(self, index) -> "Points":
        return Points(self.params[index], self.tokens[index], self.loss[index],
                      None if self.budget is None else self.budget[index])

    @classmethod
    def from_csv(cls, path: str | Path, loss_column: str = "loss") -> "Points":
        """A CSV with columns params, tokens, loss (and optionally budget or flops)."""
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise FitError(f"{path} has no rows")
        missing = {"params", "tokens", loss_column} - set(rows[0])
        if missing:
            raise FitError(f"{path} lacks column(s) {sorted(missing)}; it needs params, tokens, {loss_column}")
        budget_column = "budget" if "budget" in rows[0] else None
        return cls([float(r["params"]) for r in rows], [float(r["tokens"]) for r in rows],
                   [float(r[loss_column]) for r in rows],
                   [float(r[budget_column]) for r in rows] if budget_column else None)


@dataclass
class FitResult:
    approach: int
    params: dict[str, float]
    intervals: dict[str, list[float]] = field(default_factory=dict)  # name -> [low, high]
    optimum: dict[str, float] = field(default_factory=dict)  # for `target_flops`: N*, D*, L*
    details: dict = field(default_factory=dict)
    samples: list = field(default_factory=list, repr=False)  # the bootstrap refits (not serialised)

    def to_dict(self) -> dict:
        return {"approach": self.approach, **self.params, "intervals": self.intervals,
                "optimum": self.optimum, **self.details}


# --- approach 3 ---------------------------------------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective(theta, log_n, log_d, log_l, delta):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, points]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    pred = top + np.log(total)
    weights /= total
    value, dr = _huber(pred - log_l, delta)
    value, dr = value / delta**2, dr / delta**2  # O(1) values: L-BFGS-B's tolerances are absolute
    grad = np.array([
        (dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
        -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum(),
    ])
    return value.sum(), grad


def _fit_law(points: Points, inits, delta: float, starts: int = 8):
    """Best L-BFGS-B solution from the `starts` initialisations with the lowest objective."""
    log_n, log_d, log_l = np.log(points.params), np.log(points.tokens), np.log(points.loss)
    bounds = [BOUNDS[k] for k in ("a", "b", "e", "alpha", "beta")]
    inits = np.asarray(inits, dtype=float)
    if len(inits) > starts:
        values = [_objective(theta, log_n, log_d, log_l, delta)[0] for theta in inits]
        inits = inits[np.argsort(values)[:starts]]
    best = None
    for theta0 in inits:
        res = minimize(_objective, theta0, args=(log_n, log_d, log_l, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds, options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if best is None or res.fun < best.fun:
            best = res
    return best.x, best.fun


def _law_params(theta) -> dict[str, float]:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def law_loss(law: dict, params, tokens):
    return law["E"] + law["A"] / np.asarray(params, float) ** law["alpha"] + law["B"] / np.asarray(tokens, float) ** law["beta"]


def law_optimum(law: dict, flops: float) -> dict[str, float]:
    """Compute-optimal N*, D*, L* of a parametric law at C = 6 N D."""
    alpha, beta = law["alpha"], law["beta"]
    # in logs: a degenerate bootstrap refit (an exponent at its bound) must not overflow
    log_g = (math.log(alpha * law["A"]) - math.log(beta * law["B"])) / (alpha + beta)
    log_n = log_g + beta / (alpha + beta) * math.log(flops / FLOPS_PER_PARAM_TOKEN)
    n_opt = math.exp(min(max(log_n, -690.0), 690.0))
    d_opt = flops / FLOPS_PER_PARAM_TOKEN / n_opt
    return {"flops": flops, "N": float(n_opt), "D": float(d_opt), "loss": float(law_loss(law, n_opt, d_opt))}


def _percentile_intervals(samples: list[dict], level: float) -> dict[str, list[float]]:
    low, high = 50 * (1 - level), 50 * (1 + level)
    return {key: [float(np.percentile([s[key] for s in samples], q, method="nearest")) for q in (low, high)]
            for key in samples[0]}


def fit_approach3(points: Points, *, target_flops: float | None = None, bootstrap: int = 200, level: float = 0.95,
                  delta: float = HUBER_DELTA, seed: int = 0, init_grid: dict | None = None) -> FitResult:
    if len(points) < 6:
        raise FitError(f"approach 3 fits 5 parameters: it needs at least 6 points, got {len(points)}")
    grid = init_grid or INIT_GRID
    inits = list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]))
    theta, objective = _fit_law(points, inits, delta)
    law = _law_params(theta)
    target = target_flops or float(points.flops.max())
    rng = np.random.default_rng(seed)
    # Bootstrap refits start from the full fit and the two best grid points of each resample.
    samples = []
    for _ in range(bootstrap):
        sample = points.take(rng.integers(0, len(points), len(points)))
        refit = _law_params(_fit_law(sample, [theta, *inits], delta, starts=3)[0])
        optimum = law_optimum(refit, target)
        samples.append(refit | {"N_opt": optimum["N"], "D_opt": optimum["D"], "L_opt": optimum["loss"],
                                "a": refit["beta"] / (refit["alpha"] + refit["beta"])})
    optimum = law_optimum(law, target)
    names = ("a", "b", "e", "alpha", "beta")
    at_bounds = [name for name, value in zip(names, theta)
                 if min(abs(value - BOUNDS[name][0]), abs(value - BOUNDS[name][1])) < 1e-6]
    return FitResult(
        approach=3, params=law,
        intervals=_percentile_intervals(samples, level) if samples else {},
        optimum=optimum, samples=samples,
        details={"huber_objective": float(objective) * delta**2,
                 "at_bounds": at_bounds,  # parameters pinned at a bound: the law is not identified
                 "points": len(points), "bootstrap": len(samples), "level": level,
                 "N_exponent": law["beta"] / (law["alpha"] + law["beta"]),
                 "residuals": (np.log(points.loss) - np.log(law_loss(law, points.params, points.tokens))).tolist()},
    )


# --- approach 2 ---------------------------------------------------------------------------------
class IsoFlopRejected(FitError):
    """A budget whose parabola does not bracket a minimum."""


def _budget_groups(points: Points) -> dict[float, np.ndarray]:
    if points.budget is not None:
        keys = points.budget
    else:  # group by compute within 5% (log10 rounded to 0.02)
        keys = np.array([10 ** (round(math.log10(c) / 0.02) * 0.02) for c in points.flops])
    return {float(k): np.flatnonzero(keys == k) for k in sorted(set(keys.tolist()))}


def isoflop_vertex(log_n: np.ndarray, loss: np.ndarray) -> float:
    """log N at the parabola's minimum; raises IsoFlopRejected if concave or not bracketed."""
    if len(log_n) < 3 or len(set(log_n.tolist())) < 3:
        raise IsoFlopRejected("needs at least 3 distinct model sizes")
    c2, c1, _ = np.polyfit(log_n, loss, 2)
    if c2 <= 0:
        raise IsoFlopRejected(f"concave parabola (curvature {c2:.3g} <= 0): no minimum")
    vertex = -c1 / (2 * c2)
    lo, hi = log_n.min(), log_n.max()
    best = log_n[np.argmin(loss)]
    if not lo < vertex < hi or best in (lo, hi):
        raise IsoFlopRejected(f"minimum at the edge of the sampled sizes (vertex N={math.exp(vertex):.3g}, "
                              f"sizes {math.exp(lo):.3g}..{math.exp(hi):.3g}): extend the grid")
    return float(vertex)


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = k x^a by least squares in log space: (a, log k)."""
    a, log_k = np.polyfit(np.log(x), np.log(y), 1)
    return float(a), float(log_k)


def _isoflop_fit(points: Points, groups: dict[float, np.ndarray]):
    optima, rejected = [], []
    for budget, index in groups.items():
        try:
            vertex = isoflop_vertex(np.log(points.params[index]), points.loss[index])
        except IsoFlopRejected as err:
            rejected.append({"budget": budget, "reason": str(err)})
            continue
        flops = float(np.exp(np.mean(np.log(points.flops[index]))))
        optima.append((flops, math.exp(vertex)))
    return optima, rejected


def fit_approach2(points: Points, *, target_flops: float | None = None, bootstrap: int = 200, level: float = 0.95,
                  seed: int = 0) -> FitResult:
    groups = _budget_groups(points)
    optima, rejected = _isoflop_fit(points, groups)
    if len(optima) < 2:
        raise FitError(f"approach 2 needs >= 2 budgets with a bracketed minimum; got {len(optima)} "
                       f"(rejected: {rejected})")
    flops, n_opt = (np.array(x) for x in zip(*optima))
    a, log_k = _power_law(flops, n_opt)
    target = target_flops or float(flops.max())
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        index = {b: rng.choice(i, size=len(i), replace=True) for b, i in groups.items()}
        sample_optima, _ = _isoflop_fit(points, index)
        if len(sample_optima) < 2:
            continue  # a resample that loses the bracket says nothing about the exponent
        f, n = (np.array(x) for x in zip(*sample_optima))
        sa, sk = _power_law(f, n)
        n_t = math.exp(sk) * target**sa
        samples.append({"a": sa, "N_opt": n_t, "D_opt": target / FLOPS_PER_PARAM_TOKEN / n_t})
    n_target = math.exp(log_k) * target**a
    return FitResult(
        approach=2, params={"a": a, "b": 1.0 - a, "k": math.exp(log_k)},
        intervals=_percentile_intervals(samples, level) if samples else {},
        optimum={"flops": target, "N": n_target, "D": target / FLOPS_PER_PARAM_TOKEN / n_target},
        details={"budgets": [{"flops": f, "N_opt": n} for f, n in optima], "rejected": rejected,
                 "points": len(points), "bootstrap": len(samples), "level": level},
    )


# --- approach 1 ---------------------------------------------------------------------------------
def envelope(points: Points) -> np.ndarray:
    """Indices of the compute/loss Pareto front: each beats every point of no more compute."""
    order = np.argsort(points.flops, kind="stable")
    front, best = [], math.inf
    for i in order:
        if points.loss[i] < best:
            front.append(i)
            best = points.loss[i]
    return np.array(front, dtype=int)


def fit_approach1(points: Points, *, target_flops: float | None = None, bootstrap: int = 200, level: float = 0.95,
                  seed: int = 0) -> FitResult:
    front = envelope(points)
    if len(front) < 2:
        raise FitError(f"approach 1 needs >= 2 envelope points, got {len(front)}")
    a, log_k = _power_law(points.flops[front], points.params[front])
    target = target_flops or float(points.flops.max())
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        sample = points.take(rng.integers(0, len(points), len(points)))
        sample_front = envelope(sample)
        if len(set(sample.flops[sample_front].tolist())) < 2:
            continue
        sa, sk = _power_law(sample.flops[sample_front], sample.params[sample_front])
        n_t = math.exp(sk) * target**sa
        samples.append({"a": sa, "N_opt": n_t, "D_opt": target / FLOPS_PER_PARAM_TOKEN / n_t})
    n_target = math.exp(log_k) * target**a
    return FitResult(
        approach=1, params={"a": a, "b": 1.0 - a, "k": math.exp(log_k)},
        intervals=_percentile_intervals(samples, level) if samples else {},
        optimum={"flops": target, "N": n_target, "D": target / FLOPS_PER_PARAM_TOKEN / n_target},
        details={"envelope": front.tolist(), "points": len(points), "bootstrap": len(samples), "level": level},
    )


def fit(points: Points, approach: int, **kwargs) -> FitResult:
    fitters = {1: fit_approach1, 2: fit_approach2, 3: fit_approach3}
    if approach not in fitters:
        raise FitError(f"approach must be 1, 2 or 3, got {approach}")
    return fitters[approach](points, **kwargs)


def noise_floor(keys: list, loss) -> dict[str, float]:
    """Seed-to-seed spread: pooled standard deviation of the loss over groups of identical configs
    (`keys`, e.g. config hashes without the seed) with at least two seeds."""
    groups: dict = {}
    for key, value in zip(keys, np.asarray(loss, float)):
        groups.setdefault(key, []).append(value)
    repeated = [np.asarray(v) for v in groups.values() if len(v) > 1]
    if not repeated:
        return {"std": float("nan"), "groups": 0, "dof": 0}
    ss = sum(((v - v.mean()) ** 2).sum() for v in repeated)
    dof = sum(len(v) - 1 for v in repeated)
    return {"std": float(math.sqrt(ss / dof)), "groups": len(repeated), "dof": int(dof)}
