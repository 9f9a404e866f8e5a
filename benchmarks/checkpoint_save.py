"""Training step time around a checkpoint save, synchronous vs asynchronous (checkpoint.async_save).

    python benchmarks/checkpoint_save.py                    # 125M-shaped Sessa on CPU, ~2 minutes
    python benchmarks/checkpoint_save.py --layers 12 --steps 10 --save-at 4

Runs the real trainer (`python -m pretrain`, one process) twice on the built-in corpus, once with
each kind of save every --save-at steps, and prints each step's wall time from metrics.jsonl
(`perf/step_s`: a step's window runs from the previous step's log line to its own, so the save made
after step N falls into step N+1's row), the seconds each save call held training and when each
asynchronous save was published. The model has a 125M model's width (768 hidden, 12 heads; --layers
Sessa blocks) over the 4096-token test vocabulary; its checkpoint (weights and Adam moments in fp32)
takes seconds to write.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def recipe(data: Path, runs: Path, layers: int, steps: int, save_at: int) -> dict:
    return {
        "run_name": "bench", "runs_dir": str(runs),
        "model": {"vocab_size": 4096, "hidden_size": 768, "num_layers": layers, "num_heads": 12,
                  "num_kv_heads": 12},
        "train": {"max_steps": steps, "global_batch_tokens": 128, "micro_batch_size": 2, "seed": 1,
                  "hang_timeout_s": 0},
        "data": {"path": str(data), "num_workers": 1},
        "schedule": {"warmup_steps": 1},
        "checkpoint": {"interval_steps": save_at, "save_on_exit": False},
        "logging": {"interval": 1, "wandb": "disabled", "progress_bar": False},
        "eval": {"interval": 0, "batches": 1, "sample_tokens": 0},
    }


def run(config: Path, name: str, async_save: bool) -> tuple[dict[int, float], list[float], str]:
    """Each step's seconds, the seconds each save call held training, and the log."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    done = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config), "--run_name", name,
                           "--checkpoint.async_save", str(async_save).lower()],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (config.parent / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    held = [float(s) for s in re.findall(r"(?:saved|writing) checkpoint \S+ \(([\d.]+) s\)", done.stdout)]
    return {m["step"]: m["perf/step_s"] for m in metrics if "perf/step_s" in m}, held, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=3)
    args = parser.parse_args()

    import yaml

    from data_pipeline.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare("builtin", "pydocs4k", 64, tmp / "data", num_workers=1, progress=False)
        config = tmp / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe(tmp / "data", tmp / "runs", args.layers, args.steps, args.save_at)))
        sync_steps, sync_held, _ = run(config, "sync", False)
        async_steps, async_held, log = run(config, "async", True)
        checkpoint = tmp / "runs" / "sync" / "checkpoints" / f"iter_{args.save_at:07d}"
        size_gb = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 1e9
    published = re.findall(r"published checkpoint \S+ \(([\d.]+) s after", log)

    print(f"{args.layers} layers of 768, checkpoint {size_gb:.2f} GB, saved after every {args.save_at} steps")
    print(f"save calls held training: synchronous {', '.join(f'{s:.1f}' for s in sync_held)} s; asynchronous "
          f"{', '.join(f'{s:.1f}' for s in async_held)} s, each published {', '.join(published)} s after it started")
    print("| step | synchronous step s | asynchronous step s |")
    print("|---:|---:|---:|")
    for step in sorted(sync_steps):
        mark = " (after a save)" if step > 1 and (step - 1) % args.save_at == 0 else ""
        print(f"| {step}{mark} | {sync_steps[step]:.2f} | {async_steps.get(step, float('nan')):.2f} |")
    around = [s for s in sorted(sync_steps) if s > args.save_at]
    print(f"| steps {around[0]}-{around[-1]} total | {sum(sync_steps[s] for s in around):.2f} | "
          f"{sum(async_steps[s] for s in around):.2f} |")


if __name__ == "__main__":
    main()
