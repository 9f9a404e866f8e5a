"""Collect a sweep's results: one row per (run, evaluated checkpoint), as CSV and Parquet.

Reads `<sweep>/plan.json` and each run's `runs/<name>/metrics.jsonl` (the trainer's log) and
`runs/<name>/scaling.json` (written by `launch`: git commit, status). Columns:

  run, arch, seq_len, config_hash, git_commit, seed, budget (planned FLOPs), step, steps,
  params, params_non_embedding, tokens, flops_model, flops_6N, flops_6N_non_embedding,
  loss_nats (held-out), bits_per_byte, post_cooldown, diverged, divergence

Only rows with post_cooldown true and diverged false are fitted: the last evaluation of a finished
WSD run (its LR has decayed). Bits per byte use the corpus' bytes per token from the data manifest.
Divergence is a non-finite training loss or a spike (a logged loss above `spike_ratio` x the running
minimum after warmup); a diverged run is kept in the table and flagged, never dropped.
"""
import csv
import json
import math
from pathlib import Path

import yaml

from .plan import arm_slug

COLUMNS = ["run", "arch", "seq_len", "config_hash", "git_commit", "seed", "budget", "step", "steps", "params",
           "params_non_embedding", "tokens", "flops_model", "flops_6N", "flops_6N_non_embedding", "loss_nats",
           "bits_per_byte", "post_cooldown", "diverged", "divergence"]


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return records


def divergence(records: list[dict], warmup_steps: int = 0, spike_ratio: float = 1.5) -> str:
    """'' if the training loss looks healthy, else why not (non-finite loss, or a spike)."""
    best = math.inf
    for record in records:
        loss = record.get("train/loss")
        if loss is None:
            continue
        if not math.isfinite(loss):
            return f"non-finite loss at step {record['step']}"
        if record["step"] > warmup_steps and best < math.inf and loss > spike_ratio * best:
            return f"loss spike at step {record['step']}: {loss:.3g} > {spike_ratio} x {best:.3g}"
        best = min(best, loss)
    return ""


def bytes_per_token(data_path: str | Path) -> float:
    try:
        manifest = json.loads((Path(data_path) / "manifest.json").read_text())
        docs = manifest["documents"]
        return docs["text_bytes"] / docs["tokens"]
    except (OSError, KeyError, ZeroDivisionError, json.JSONDecodeError):
        return float("nan")


def collect(sweep: str | Path) -> list[dict]:
    sweep = Path(sweep)
    plan = json.loads((sweep / "plan.json").read_text())
    rows = []
    per_byte = {}
    for point in plan["points"]:
        run_dir = sweep / "runs" / point["name"]
        records = read_metrics(run_dir / "metrics.jsonl")
        if not records:
            continue
        info = json.loads((run_dir / "scaling.json").read_text()) if (run_dir / "scaling.json").exists() else {}
        config = yaml.safe_load((sweep / "configs" / f"{point['name']}.yaml").read_text())
        data_path = config.get("data", {}).get("path", "")
        if data_path not in per_byte:
            per_byte[data_path] = bytes_per_token(data_path)
        reason = divergence(records, point["warmup_steps"])
        if info.get("status") == "diverged" and not reason:
            reason = info.get("reason", "diverged")
        evals = {}
        for record in records:
            if "val/loss" in record:
                evals[record["step"]] = record["val/loss"]  # a step evaluated twice keeps its last value
        for step, loss in sorted(evals.items()):
            tokens = step * point["batch_tokens"]
            rows.append({
                "run": point["name"], "arch": point["arch"], "seq_len": point["seq_len"],
                "config_hash": point["config_hash"], "git_commit": info.get("git_commit", ""),
                "seed": config.get("train", {}).get("seed", 0), "budget": point["target_flops"],
                "step": step, "steps": point["steps"], "params": point["params"],
                "params_non_embedding": point["params_non_embedding"], "tokens": tokens,
                "flops_model": tokens * point["flops_per_token"], "flops_6N": 6.0 * point["params"] * tokens,
                "flops_6N_non_embedding": 6.0 * point["params_non_embedding"] * tokens,
                "loss_nats": loss, "bits_per_byte": loss / math.log(2) / per_byte[data_path],
                "post_cooldown": step == point["steps"], "diverged": bool(reason), "divergence": reason,
            })
    return rows


def write_table(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """results.csv and results.parquet in `out_dir`; also points_<arm>.csv (params, tokens, loss,
    budget of the fitted rows; a pattern arm spelled as plan.arm_slug does) for `fit --points`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, parquet_path = out_dir / "results.csv", out_dir / "results.parquet"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), parquet_path)
    for arch in sorted({r["arch"] for r in rows}):
        with open(out_dir / f"points_{arm_slug(arch)}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["params", "tokens", "loss", "budget", "seq_len"])
            for r in fit_rows(rows, arch):
                writer.writerow([r["params"], r["tokens"], r["loss_nats"], r["budget"], r["seq_len"]])
    return csv_path, parquet_path


def fit_rows(rows: list[dict], arch: str | None = None) -> list[dict]:
    return [r for r in rows if r["post_cooldown"] and not r["diverged"] and (arch is None or r["arch"] == arch)]


def read_table(path: str | Path) -> list[dict]:
    """Rows of results.csv with their types back."""
    kinds = {"seq_len": int, "seed": int, "step": int, "steps": int, "params": int, "params_non_embedding": int,
             "tokens": int, "post_cooldown": lambda v: v == "True", "diverged": lambda v: v == "True"}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        typed = {}
        for key, value in row.items():
            if key in kinds:
                typed[key] = kinds[key](value)
            elif key in ("run", "arch", "config_hash", "git_commit", "divergence"):
                typed[key] = value
            else:
                typed[key] = float(value)
        out.append(typed)
    return out


def _schema():
    import pyarrow as pa

    types = {"run": pa.string(), "arch": pa.string(), "config_hash": pa.string(), "git_commit": pa.string(),
             "divergence": pa.string(), "post_cooldown": pa.bool_(), "diverged": pa.bool_()}
    ints = {"seq_len", "seed", "step", "steps", "params", "params_non_embedding", "tokens"}
    return pa.schema([(c, types.get(c, pa.int64() if c in ints else pa.float64())) for c in COLUMNS])
