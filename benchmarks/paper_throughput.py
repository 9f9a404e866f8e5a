"""Which arm of the paper's GPU comparison (benchmarks/gpu/paper.py) is slowest per step, and what costs
time around the steps, at that part's shapes (two-style 640 tokens, Diffuse MQAR 192, batch 16).

    python benchmarks/paper_throughput.py [--steps 8] [--tasks two-style diffuse-mqar] [--device cpu|cuda]

Per arm, through the real trainer (benchmarks/gpu/paper.py's configs and data, fewer examples):
  start s      Trainer(config) (model, optimizer, data loader) and the first step's wait for data,
               with the recipe's one loader worker and with none (the paper part's choice);
  step ms      the trainer's loop per step (metrics.jsonl perf/step_s over the steps after the first);
  engine ms    the engine's train_step alone on one batch (median of --steps): the model's forward,
               backward and optimizer; step - engine is the loop's own overhead per step;
  score s      pretrain.evaluate's scoring of --limit test examples (scoring.py's batch size for the
               device).
Prints a markdown table (or JSON with --json).
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu.paper import ARMS, TASKS, load_arm_config, prepare_data  # noqa: E402
from benchmarks.measure import median_seconds  # noqa: E402


def measure_arm(task: str, model: str, work: Path, steps: int, limit: int, device: torch.device) -> dict:
    from pretrain.evaluate.tasks import load_task, score_task
    from pretrain.evaluate.targets import load_target
    from pretrain.loop import Trainer

    row = {"arm": f"{task}-{model}"}
    for workers in (1, 0):  # the recipe's worker, then the paper part's in-process loading
        run = load_arm_config(task, model, work, 1, steps, ("--logging.interval", "1", "--data.num_workers",
                                                            str(workers), "--run_name", f"{task}-{model}-w{workers}"))
        t0 = time.perf_counter()
        trainer = Trainer(run)
        try:
            start_s = time.perf_counter() - t0
            trainer.train()
            logged = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
            logged = [m for m in logged if "perf/step_s" in m]
            # start-up: the trainer's construction and the first step's wait for data
            row[f"start_s_workers{workers}"] = round(start_s + logged[0]["perf/data_wait_s"], 2)
            if workers == 0:
                row["step_ms"] = round(1e3 * statistics.median(m["perf/step_s"] for m in logged[1:]), 1)
                batch = next(iter(trainer.train_loader))
                row["engine_ms"] = round(1e3 * median_seconds(lambda: trainer.engine.train_step(iter([batch])),
                                                              device, steps), 1)
                row["loop_overhead_ms"] = round(row["step_ms"] - row["engine_ms"], 1)
                row["params"] = sum(p.numel() for p in trainer.engine.chunks[0].parameters())
        finally:
            trainer.close()
    target = load_target(run.run_dir, device=device)
    test = load_task(task, limit=limit, trained_sources=target.info.get("sources") or ())
    t0 = time.perf_counter()
    score_task(target.model, target.tokenizer, test)
    row["score_s"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per arm (the first is not counted)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--limit", type=int, default=20, help="test examples scored per arm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="paper-throughput-"))
    try:
        prepare_data(work / "data", False, tuple(args.tasks), n=max(64, 16 * args.steps))
        rows = [measure_arm(task, model, work, args.steps, args.limit, torch.device(args.device))
                for task, model in ARMS if task in args.tasks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch 16, "
          f"{args.steps} steps per arm, {args.limit} test examples scored")
    print("| arm | params | start s (1 worker) | start s (0 workers) | step ms | engine ms | loop overhead ms | "
          "score s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arm']} | {r['params']:,} | {r['start_s_workers1']} | {r['start_s_workers0']} | {r['step_ms']} | "
              f"{r['engine_ms']} | {r['loop_overhead_ms']} | {r['score_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
