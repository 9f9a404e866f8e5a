"""Plots (matplotlib, PNG) and the markdown report of a collected sweep.

  isoflop.png    loss vs parameters per budget, with the approach-3 law's isoFLOP curve
  optimal.png    N*, D*, L* vs compute per architecture, bands from the bootstrap refits
  residuals.png  log-loss residuals of each architecture's law
  loss_curves.png  training loss vs tokens of every run
  overlay.png    Sessa vs Transformer: points and compute-optimal L*(C)
  report.md      the fitted table with intervals, the comparison, links to the plots
"""
import json
import math
from pathlib import Path

import numpy as np

from .collect import fit_rows, read_metrics
from .fit import FitError, Points, fit_approach3, law_loss, law_optimum, noise_floor

COLORS = {"sessa": "tab:blue", "transformer": "tab:orange"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _points(rows, arch) -> Points:
    chosen = fit_rows(rows, arch)
    return Points([r["params"] for r in chosen], [r["tokens"] for r in chosen], [r["loss_nats"] for r in chosen],
                  [r["budget"] for r in chosen])


def fit_arms(rows: list[dict], bootstrap: int = 100, seed: int = 0) -> dict:
    fits = {}
    for arch in sorted({r["arch"] for r in rows}):
        try:
            fits[arch] = fit_approach3(_points(rows, arch), bootstrap=bootstrap, seed=seed)
        except FitError as err:
            fits[arch] = err
    return fits


def plot_all(rows: list[dict], out_dir: str | Path, sweep: str | Path | None = None, fits: dict | None = None,
             comparison: dict | None = None, elapsed_s: float | None = None) -> Path:
    """The five figures (isoflop, optimal, residuals, loss_curves, overlay .png) and the report in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fits = fits if fits is not None else fit_arms(rows)
    good = {a: f for a, f in fits.items() if not isinstance(f, Exception)}
    flops = np.array([r["flops_6N"] for r in fit_rows(rows)] or [1.0])
    compute_grid = np.logspace(math.log10(flops.min()) - 0.3, math.log10(flops.max()) + 0.5, 60)
    plot_isoflop(rows, sorted(fits), good, out / "isoflop.png")
    plot_optimal(good, compute_grid, out / "optimal.png")
    plot_residuals(rows, good, out / "residuals.png")
    plot_loss_curves(sweep, out / "loss_curves.png")
    plot_overlay(rows, sorted(fits), good, compute_grid, out / "overlay.png")
    return write_report(out, fits, comparison, rows, elapsed_s)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_isoflop(rows: list[dict], archs: list[str], good: dict, path: Path) -> None:
    """Per arch, loss against parameters at each compute budget, with the fitted law's isoFLOP curve."""
    fig, axes = _plt().subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        pts = _points(rows, arch)
        for budget in sorted(set(pts.budget.tolist())):
            sel = pts.budget == budget
            line = ax.plot(pts.params[sel], pts.loss[sel], "o", label=f"C={budget:.1e}")[0]
            if arch in good:
                n = np.logspace(math.log10(pts.params.min()) - 0.3, math.log10(pts.params.max()) + 0.3, 50)
                c = np.exp(np.mean(np.log(6 * pts.params[sel] * pts.tokens[sel])))
                ax.plot(n, law_loss(good[arch].params, n, c / (6 * n)), "-", color=line.get_color(), alpha=0.6)
        ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss (nats)", title=f"{arch}: isoFLOP")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_optimal(good: dict, compute_grid: np.ndarray, path: Path) -> None:
    """N*, D* and L* against compute, with the bootstrap's 95% band."""
    fig, axes = _plt().subplots(1, 3, figsize=(15, 4))
    for arch, f in good.items():
        for ax, key in zip(axes, ("N", "D", "loss")):
            ax.plot(compute_grid, [law_optimum(f.params, c)[key] for c in compute_grid], color=COLORS.get(arch),
                    label=arch)
            if f.samples:
                curves = np.array([[law_optimum(s, c)[key] for c in compute_grid] for s in f.samples])
                ax.fill_between(compute_grid, *np.percentile(curves, [2.5, 97.5], axis=0), color=COLORS.get(arch),
                                alpha=0.2)
    for ax, label in zip(axes, ("N* (parameters)", "D* (tokens)", "L* (nats)")):
        ax.set(xscale="log", yscale="log" if label[0] in "ND" else "linear", xlabel="compute C = 6ND (FLOPs)",
               ylabel=label)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_residuals(rows: list[dict], good: dict, path: Path) -> None:
    fig, ax = _plt().subplots(figsize=(6, 4))
    for arch, f in good.items():
        pts = _points(rows, arch)
        ax.plot(pts.params, np.log(pts.loss) - np.log(law_loss(f.params, pts.params, pts.tokens)), "o",
                color=COLORS.get(arch), label=arch)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="parameters N", ylabel="log L - log L_fit", title="residuals")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_loss_curves(sweep: str | Path | None, path: Path) -> None:
    """Every run's training loss against tokens seen (an empty figure without a sweep folder)."""
    fig, ax = _plt().subplots(figsize=(7, 4.5))
    if sweep is not None:
        plan = json.loads((Path(sweep) / "plan.json").read_text())
        for point in plan["points"]:
            records = [r for r in read_metrics(Path(sweep) / "runs" / point["name"] / "metrics.jsonl")
                       if "train/loss" in r]
            if records:
                ax.plot([r["step"] * point["batch_tokens"] for r in records], [r["train/loss"] for r in records],
                        color=COLORS.get(point["arch"]), alpha=0.5, lw=0.8)
    ax.set(xscale="log", xlabel="tokens", ylabel="training loss", title="loss curves (blue: Sessa, orange: Transformer)")
    _save(fig, path)


def plot_overlay(rows: list[dict], archs: list[str], good: dict, compute_grid: np.ndarray, path: Path) -> None:
    """Both arms' fitted points and L*(C) on one compute axis."""
    fig, ax = _plt().subplots(figsize=(6, 4))
    for arch in archs:
        chosen = fit_rows(rows, arch)
        ax.plot([r["flops_6N"] for r in chosen], [r["loss_nats"] for r in chosen], "o", color=COLORS.get(arch),
                alpha=0.6, label=f"{arch} points")
        if arch in good:
            ax.plot(compute_grid, [law_optimum(good[arch].params, c)["loss"] for c in compute_grid],
                    color=COLORS.get(arch), label=f"{arch} L*(C)")
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="held-out loss (nats)", title="Sessa vs Transformer")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(out: Path, fits: dict, comparison: dict | None, rows: list[dict], elapsed_s: float | None) -> Path:
    lines = ["# Scaling sweep report", ""]
    if elapsed_s is not None:
        lines += [f"Sweep wall time: {elapsed_s / 60:.1f} min.", ""]
    fitted = len(fit_rows(rows))
    chosen = fit_rows(rows)
    floor = noise_floor([(r["arch"], r["params"], r["tokens"]) for r in chosen], [r["loss_nats"] for r in chosen])
    lines += [f"{len(rows)} result rows, {fitted} post-cooldown and not diverged (fitted); "
              f"{sum(r['diverged'] for r in rows)} rows of diverged runs flagged.", "",
              f"Noise floor (seed-to-seed std of the held-out loss, pooled over {floor['groups']} repeated points): "
              + (f"{floor['std']:.4g} nats." if floor["groups"] else "no point was repeated with another seed "
                 "(plan again with --seed N --append)."), "",
              "## Fitted laws L(N, D) = E + A/N^alpha + B/D^beta (approach 3, 95% bootstrap intervals)", "",
              "| arch | E | A | B | alpha | beta |", "|---|---|---|---|---|---|"]
    for arch, f in fits.items():
        if isinstance(f, Exception):
            lines.append(f"| {arch} | fit failed: {f} | | | | |")
            continue
        cells = []
        for name in ("E", "A", "B", "alpha", "beta"):
            band = f.intervals.get(name)
            cells.append(f"{f.params[name]:.4g}" + (f" [{band[0]:.3g}, {band[1]:.3g}]" if band else ""))
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    for arch, f in fits.items():
        if not isinstance(f, Exception) and f.details.get("at_bounds"):
            lines.append(f"\n**{arch}: {', '.join(f.details['at_bounds'])} at the optimiser's bounds: the data do not "
                         f"identify the law (too few sizes/tokens); its extrapolations, N*, D* and the compute "
                         f"multiplier are not meaningful.**")
    for seq_len, arms in (comparison or {}).items():
        for arm, result in arms.items():
            baseline = result["baseline"]
            lines += ["", f"## {arm} vs {baseline}, sequence length {seq_len}", ""]
            if "error" in result:
                lines += [result["error"], ""]
                continue
            lines += [f"| budget (FLOPs) | compute multiplier | interval | L*_{arm} | L*_{baseline} |",
                      "|---|---|---|---|---|"]
            for row in result["multiplier"]:
                band = row.get("interval")
                lines.append(f"| {row['flops']:.3g} | {row['multiplier']:.3g} | "
                             f"{'[%.3g, %.3g]' % tuple(band) if band else '-'} | {row[f'{arm}_loss']:.4g} | "
                             f"{row[f'{baseline}_loss']:.4g} |")
            lines += ["", f"| exponent | {arm} | {baseline} | difference | interval | p |", "|---|---|---|---|---|---|"]
            for name, e in result["exponents"].items():
                band = e.get("interval")
                lines.append(f"| {name} | {e[arm]:.3g} | {e[baseline]:.3g} | {e['difference']:+.3g} | "
                             f"{'[%.3g, %.3g]' % tuple(band) if band else '-'} | {e.get('p_value', float('nan')):.3g} |")
            lines.append("")
    lines += ["", "## Plots", ""] + [f"![{name}]({name}.png)" for name in
                                     ("isoflop", "optimal", "residuals", "loss_curves", "overlay")]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
