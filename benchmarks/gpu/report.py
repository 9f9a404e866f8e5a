"""gpu.json's content from the parts' results, and gpu.md, its tables."""
import time
from collections import Counter

from benchmarks.gpu.parts import PARTS
from benchmarks.gpu.targets import judge

SCHEMA = "sessa-gpu-check/1"


def assemble(header: dict, collected: dict, dry: bool, start: float) -> dict:
    """The report from the parts collected so far (the others: status "pending"). Parts that share a
    section (the runs of part d) are listed together under its "runs"."""
    report = dict(header, parts={})
    parts_per_section = Counter(spec.section for spec in PARTS.values())
    for key, spec in PARTS.items():
        part = collected.get(key, {"status": "pending", "seconds": 0, "budget_s": 0})
        if parts_per_section[spec.section] == 1:
            report["parts"][spec.section] = part
            continue
        section = report["parts"].setdefault(spec.section, {"status": "ok", "seconds": 0.0, "budget_s": 0.0,
                                                           "runs": []})
        run = dict(part.get("run", {"recipe": spec.args[0], "arch": spec.args[1]}))
        run["status"] = part["status"]
        if "error" in part:
            run["error"] = part["error"]
        section["runs"].append(run)
        section["seconds"] = round(section["seconds"] + part["seconds"], 1)
        section["budget_s"] = round(section["budget_s"] + part["budget_s"], 1)
        if part["status"] != "ok" and section["status"] == "ok":
            section["status"] = part["status"]
    report["targets"] = judge(report["parts"])
    if dry:  # tiny shapes on a CPU: nothing to judge
        for target in report["targets"].values():
            for key in ("met", "stretch_met"):
                if key in target:
                    target[key] = None
    report["total_seconds"] = round(time.time() - start, 1)
    return report


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def render_markdown(report: dict) -> str:
    """gpu.md: the tables of gpu.json."""
    parts, env = report["parts"], report["parts"]["env"]
    info = env.get("info", {})
    lines = [f"# GPU check {'(dry run, CPU: numbers meaningless)' if report['dry_run'] else ''}".rstrip(), "",
             f"{report['date_utc']} · {info.get('device_name', info.get('device', '?'))} · torch {info.get('torch')} · "
             f"triton {info.get('triton')} · megatron-core {info.get('megatron_core')} · commit {report['git_commit']}"
             f" · {report['total_seconds']} s", "",
             f"Measured here: bf16 matmul {_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s, tf32 "
             f"{_fmt(env.get('tf32_matmul_tflops'))}, fp32 {_fmt(env.get('fp32_matmul_tflops'))}; copy "
             f"{_fmt(env.get('copy_tb_s'))} TB/s (read + write).", "",
             "| part | status | seconds (box) | error |", "|---|---|---|---|"]
    for key, part in parts.items():
        lines.append(f"| {key} | {part['status']} | {part['seconds']} ({part['budget_s']}) | {part.get('error', '')} |")
    a = parts["a_correctness"]
    lines += ["", f"## a. Correctness (norm-relative error vs dense fp64; tolerance {a.get('tolerance_norm_rel')})", "",
              "| B | T | D | dtype | triton worst | chunked worst | passed |", "|---|---|---|---|---|---|---|"]
    for case in a.get("cases", []):
        worst = {impl: max((e[0] for e in case[impl]["errors"].values()), default=None) if impl in case else None
                 for impl in ("triton", "chunked")}
        lines.append(f"| {case['B']} | {case['T']} | {case['D']} | {case['dtype']} | {_fmt(worst['triton'])} | "
                     f"{_fmt(worst['chunked'])} | {case.get('passed', case.get('skipped', '-'))}"
                     f"{' ' + case['error'] if 'error' in case else ''} |")
    lines += ["", "## b. Feedback solve vs causal SDPA (one head of size D, B = 1)", "",
              "| impl | T | D | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s (attention formula) | executed TFLOP/s | "
              "peak GB | note |", "|---|---|---|---|---|---|---|---|---|"]
    for row in parts["b_solve_vs_sdpa"].get("rows", []):
        note = row.get("error") or row.get("skipped") or row.get("backend", "")
        lines.append(f"| {row['impl']} | {row['T']} | {row['D']} | {_fmt(row.get('fwd_ms'))} | "
                     f"{_fmt(row.get('fwd_bwd_ms'))} | {_fmt(row.get('fwd_bwd_attention_tflops'))} | "
                     f"{_fmt(row.get('fwd_bwd_executed_tflops'))} | {_fmt(row.get('fwd_bwd_peak_gb'))} | {note} |")
    for T, ratio in parts["b_solve_vs_sdpa"].get("triton_over_sdpa", {}).items():
        lines.append(f"\ntriton / sdpa at T = {T}: forward {ratio['fwd']}x, forward+backward {ratio['fwd_bwd']}x")
    c = parts["c_long_layer"]
    lines += ["", "## c. One Sessa layer forward+backward", "",
              f"T = {c.get('T')}, D = {c.get('D')}, heads {c.get('num_heads')}/{c.get('num_kv_heads')}, "
              f"{c.get('dtype')}: {_fmt(c.get('fwd_bwd_s'))} s, peak {_fmt(c.get('peak_gb'))} GB "
              f"(fits 80 GB: {c.get('fits_80gb')}){' · ' + c['error'] if 'error' in c else ''}"]
    lines += ["", "## d. Training step (synthetic tokens, megatron DDP + distributed Adam, bf16 autocast)", "",
              "| recipe | arch | params M | T | micro-batch | step s | tokens/s | model TFLOP/s | MFU (989) | "
              "peak GB | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in parts["d_train_step"].get("runs", []):
        lines.append(f"| {run['recipe']} | {run['arch']} | {run.get('params_m')} | {run.get('seq_len')} | "
                     f"{run.get('micro_batch_size')} | {_fmt(run.get('step_s'))} | {_fmt(run.get('tokens_per_s'))} | "
                     f"{_fmt(run.get('model_tflops'))} | {_fmt(run.get('mfu'))} | {_fmt(run.get('peak_gb'))} | "
                     f"{run.get('status', '')} {run.get('error', '')} |")
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for name, target in report["targets"].items():
        lines.append(f"| {name} ({target['target']}) | {_fmt(target['value'])} | {target['met']} |")
    return "\n".join(lines) + "\n"
