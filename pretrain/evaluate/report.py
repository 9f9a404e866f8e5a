"""Evaluation results out: JSON file, markdown table, wandb (`eval/<task>/<metric>`)."""
import json
import math
from pathlib import Path

from .evaluator import flat_metrics

METRICS = ("accuracy", "exact_match", "token_accuracy", "loss", "perplexity")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown(results: dict) -> str:
    """One row per task (and per bucket, indented), one column per metric present."""
    present = [m for m in METRICS if any(m in r for r in results.values())]
    lines = ["| task | n | " + " | ".join(present) + " |", "|---|---:|" + "---:|" * len(present)]
    for task, metrics in results.items():
        lines.append(f"| {task} | {metrics.get('count', '')} | "
                     + " | ".join(_fmt(metrics[m]) if m in metrics else "" for m in present) + " |")
        for field, values in metrics.get("buckets", {}).items():
            for bucket, bucket_metrics in values.items():
                lines.append(f"| &nbsp;&nbsp;{field}={bucket} | {bucket_metrics.get('count', '')} | "
                             + " | ".join(_fmt(bucket_metrics[m]) if m in bucket_metrics else "" for m in present)
                             + " |")
    return "\n".join(lines)


def write_json(results: dict, path, info: dict | None = None) -> Path:
    """{task: {...}} plus "_target" (what was evaluated) when `info` is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(results)
    if info is not None:
        payload["_target"] = info
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def log_wandb(results: dict, info: dict, *, mode: str, project: str) -> None:
    import wandb

    run = wandb.init(project=project, mode=mode, job_type="eval", name=f"eval-{info.get('run_name')}",
                     config={"target": info})
    try:
        run.log(flat_metrics(results), step=info.get("step") or 0)
    finally:
        run.finish()
