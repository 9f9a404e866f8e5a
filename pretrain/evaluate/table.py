"""The paper's comparison table from finished runs (SESSA.md §7).

    python -m pretrain.evaluate table --runs runs/paper-* [--tasks two-style,diffuse-mqar] [--limit N]
        [--out table.md] [--json table.json]

Every run is evaluated in this process (its `latest` checkpoint). A run trained on a synthetic task
(its data manifest names the generator) is scored on that task's held-out test split, drawn with
its own seed and knobs; other runs on every `--tasks` entry. Runs are grouped by model (Sessa,
Sessa without the feedback branch, Transformer++) and each cell is mean ± std over the group's
seeds of the task's headline metric: accuracy (classification), token accuracy (generation),
perplexity (documents). Parameter counts come from the saved config (tied embeddings once,
padded vocabulary), tokens from the checkpoint, wall time from the first to the last logged
training step of metrics.jsonl.
"""
import argparse
import json
import statistics
from pathlib import Path

import yaml

HEADLINE = {"choice": "accuracy", "generate": "token_accuracy", "loss": "perplexity"}


def model_label(model: dict) -> str:
    if model.get("arch", "sessa") == "transformer":
        return "Transformer++"
    pattern = model.get("layer_pattern") or ""
    if "M" in pattern and set(pattern) <= {"M", "-"}:  # Mamba-2 blocks (and MLPs): the Mamba-2 arm
        return "Mamba-2"
    return "Sessa" if model.get("feedback", True) else "Sessa (no feedback)"


def parameter_count(model: dict) -> int:
    from model.config import ModelConfig
    from model.lm import count_parameters
    from model.transformer import count_transformer_parameters

    config = ModelConfig(**model)
    return count_transformer_parameters(config) if config.arch == "transformer" else count_parameters(config)


def wall_time_s(run: Path) -> float | None:
    """Seconds from the first to the last logged training step (plus the first step's own time)."""
    times, first_step = [], None
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            times.append(record["time"])
            first_step = first_step if first_step is not None else record.get("perf/step_s", 0.0)
    return times[-1] - times[0] + first_step if times else None


def evaluate_run(run: Path, tasks: list[str], *, limit: int | None, progress: bool, device="cpu") -> dict:
    """{"label", "seed", "params", "tokens", "wall_s", "results": {task: {...}}, "kinds": {task: kind}};
    the model is scored on `device`."""
    from .evaluator import evaluate_target
    from .tasks import load_task
    from .targets import load_target

    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    target = load_target(run, device=device)
    sources = target.info.get("sources") or []
    own = [s["synthetic"] for s in sources if s.get("synthetic")]
    names = own or tasks
    if not names:
        raise ValueError(f"run {run} was not trained on a synthetic task; name the tasks with --tasks")
    trained = target.info.get("task_format") or {}
    loaded = [load_task(name, limit=limit, trained_sources=sources, separator=trained.get("separator"))
              for name in names]
    results = evaluate_target(target, loaded, progress=progress)
    return {"run": str(run), "label": model_label(config["model"]), "seed": config["train"]["seed"],
            "params": parameter_count(config["model"]), "tokens": target.info.get("tokens"),
            "wall_s": wall_time_s(run), "results": results, "kinds": {t.name: t.kind for t in loaded}}


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def render(rows: list[dict]) -> str:
    """One line per model: seeds, parameters, tokens and wall time per run, then one column per task."""
    tasks = sorted({t for r in rows for t in r["results"]})
    labels = [m for m in ("Sessa", "Transformer++", "Sessa (no feedback)", "Mamba-2")
              if any(r["label"] == m for r in rows)]
    kinds = {t: k for r in rows for t, k in r["kinds"].items()}
    header = ["model", "seeds", "params", "tokens / run", "wall time / run"] + [f"{t} ({HEADLINE[kinds[t]]})" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for label in labels:
        group = [r for r in rows if r["label"] == label]
        params = sorted({r["params"] for r in group})
        tokens = [r["tokens"] for r in group if r["tokens"] is not None]
        walls = [r["wall_s"] for r in group if r["wall_s"] is not None]
        cells = [label, str(len({r["seed"] for r in group})), "/".join(f"{p:,}" for p in params),
                 f"{statistics.fmean(tokens):,.0f}" if tokens else "", f"{statistics.fmean(walls):.0f} s" if walls else ""]
        for task in tasks:
            cells.append(_mean_std([r["results"][task][HEADLINE[kinds[task]]] for r in group if task in r["results"]]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run directories (one per model and seed)")
    p.add_argument("--tasks", default="", help="tasks for runs not trained on a synthetic task")
    p.add_argument("--limit", type=int, help="test examples per task (default: the task's default)")
    p.add_argument("--out", help="write the markdown table here too")
    p.add_argument("--json", help="write every run's results here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where the models are scored "
                   "(default: cuda when there is one)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows = [evaluate_run(Path(run), tasks, limit=args.limit, progress=not args.no_progress, device=args.device)
            for run in args.runs]
    table = render(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0
