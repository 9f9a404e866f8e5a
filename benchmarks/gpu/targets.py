"""The targets the GPU check judges (issues 3 and 17), from what its parts measured."""

SOLVE_OVER_SDPA_MAX, SOLVE_OVER_SDPA_STRETCH = 2.0, 1.25  # Triton fwd+bwd time / causal SDPA's, at T = 8192
MFU_MIN = {"125m": 0.38, "1.3b": 0.45}  # the Sessa arm of each recipe at T = 8192


def speed_ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per T measured by both: Triton time / SDPA time, forward and forward+backward (part b's rows)."""
    ratios = {}
    for T in dict.fromkeys(row["T"] for row in rows):
        triton = next((r for r in rows if r["impl"] == "triton" and r["T"] == T and "fwd_bwd_ms" in r), None)
        sdpa = next((r for r in rows if r["impl"] == "sdpa" and r["T"] == T and "fwd_bwd_ms" in r), None)
        if triton and sdpa:
            ratios[str(T)] = {"fwd": round(triton["fwd_ms"] / sdpa["fwd_ms"], 3),
                              "fwd_bwd": round(triton["fwd_bwd_ms"] / sdpa["fwd_bwd_ms"], 3)}
    return ratios


def _met(value, bound: float, at_most: bool):
    return None if value is None else bool(value <= bound if at_most else value >= bound)


def judge(parts: dict) -> dict:
    """Each target's value, bound and whether it is met (None where it was not measured). Part b's
    first T is the one judged (8192 on a GPU)."""
    solve = parts["b_solve_vs_sdpa"]
    rows = solve.get("rows", [])
    ratio = speed_ratios(rows).get(str(rows[0]["T"]), {}).get("fwd_bwd") if rows else None
    runs = {(run["recipe"], run["arch"]): run for run in parts["d_train_step"].get("runs", [])}
    layer = parts["c_long_layer"]
    targets = {
        "triton_fwd_bwd_over_sdpa_T8192": {
            "value": ratio, "target": f"<= {SOLVE_OVER_SDPA_MAX} (stretch {SOLVE_OVER_SDPA_STRETCH})",
            "met": _met(ratio, SOLVE_OVER_SDPA_MAX, True), "stretch_met": _met(ratio, SOLVE_OVER_SDPA_STRETCH, True)},
        "layer_T131072_fits_80gb": {"value": layer.get("peak_gb"), "target": "<= 80 GB", "met": layer.get("fits_80gb")},
    }
    for recipe, bound in MFU_MIN.items():
        mfu = runs.get((recipe, "sessa"), {}).get("mfu")
        targets[f"mfu_{recipe}"] = {"value": mfu, "target": f">= {bound}", "met": _met(mfu, bound, False)}
    return targets
