"""The paper's comparison in a GPU window (issue 30): every arm of configs/paper/ trained at full length
and scored on its test split, inside one time box.

    bash benchmarks/gpu/run.sh --part paper              # on the GPU: 240 s in all -> $OUT/paper.json, paper.md
    bash benchmarks/gpu/run.sh --part paper --dry-run    # on CPU: tiny data and steps, the same files
    python benchmarks/gpu/paper.py --out DIR [--dry-run] [--budget-s S] [--steps N] [--max-seeds K]

What it does, in one process (a process per arm would pay the imports and the CUDA start eight times):
1. draws both tasks' data with the generators of data_pipeline.synthetic into a temporary folder (both
   at once, two processes): two-style at the paper's 400-600 symbols (20 classes; 640-token
   sequences) and Diffuse MQAR with configs/paper/'s knobs (32 pairs, trained lags up to 6, test lags
   up to 24);
2. trains the arms (Sessa, Transformer++, Sessa without feedback, Mamba-2 on each task) with the
   recipes of configs/paper/, STEPS steps of batch 16 each (the same for every arm, as in the paper),
   seed 1 for every arm first, then seeds 2, 3, ... for every arm while the time left fits one more
   arm of that seed (an arm of a later seed is started only when its seed-1 time fits);
3. scores each run right after it trains on its task's test split with pretrain.evaluate (the
   table's own evaluate_run: checkpoint, task and knobs read from the run) on this device.

Time boxes: an arm's box is the time left divided by the arms of the first seed not yet run (the scoring
of the previous arm of its task, or a fifth of the box, is held back for its own scoring). At the end of
its training time the trainer gets SIGTERM, the stop signal a cluster sends: it finishes the step in
flight, saves and returns; the run is scored at the step it reached and marked `"stopped_by": "time
box"`. A run that does not return within its box plus GRACE_S is past saving: the report is written
with it marked "killed" and the process exits. paper.json and paper.md are rewritten after every arm.

Kernels: feedback_impl "auto" for every Sessa arm (the fused Triton solve on CUDA, the chunked solve on
CPU); neither CUDA graphs nor torch.compile (see docs/gpu_check.md).
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SCHEMA = "sessa-gpu-paper/1"
TASKS = ("two-style", "diffuse-mqar")
MODELS = ("sessa", "transformer", "sessa-nofb", "mamba2")
BATCH = 16  # sequences per step, every arm (configs/paper/)
# 3000 steps of 16: what a 0.2M-parameter model needs to learn two-style at 400-600 symbols (issue 30);
# the paper trains every arm for the same steps, so Diffuse MQAR gets them too.
GPU_STEPS, DRY_STEPS = 3000, 3
GPU_BUDGET_S, DRY_BUDGET_S = 240.0, 600.0
DRY_LIMIT = 8  # test examples per task in a dry run (the GPU run scores the task's whole test split, 200)
GRACE_S = 30.0  # past its box, an arm that has not returned (a hung step) ends the part
SCORING_SHARE = 0.2  # of an arm's box held back for its scoring until one of its task was timed

# Training examples: 16k per task (3000 x 16 = 48k drawn, three epochs) keeps the drawing to seconds.
# The test split scored is drawn again by pretrain.evaluate from the run's seed and knobs (200 examples).
TRAIN_EXAMPLES = {"gpu": 16000, "dry": 64}
SYNTH = {
    "gpu": {
        "two-style": ["--n-val", "16", "--n-test", "8"],  # the paper's default knobs: 400-600 symbols
        "diffuse-mqar": ["--n-val", "16", "--n-test", "8", "--pairs", "32", "--max-lag", "6"],
    },
    "dry": {  # two-style's easy CPU setting (docs/evaluation.md), 16 pairs of Diffuse MQAR
        "two-style": ["--n-val", "8", "--n-test", "8", "--min-length", "48", "--max-length", "56",
                      "--block-min", "18", "--block-max", "24"],
        "diffuse-mqar": ["--n-val", "8", "--n-test", "8", "--pairs", "16", "--max-lag", "2"],
    },
}


ARMS = [(task, model) for task in TASKS for model in MODELS]  # configs/paper/{task}-{model}.yaml


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def prepare_data(data_dir: Path, dry: bool, tasks: tuple[str, ...] = TASKS, n: int | None = None) -> dict:
    """The tasks' shards (chars tokenizer, one example per sequence, loss on the answer), all drawn at
    once, `n` training examples each (default TRAIN_EXAMPLES); {task: seconds}."""
    kind = "dry" if dry else "gpu"
    start, procs = time.time(), {}
    for task in tasks:
        command = [sys.executable, "-m", "data_pipeline", "synth", task, "--out", str(data_dir / task),
                   "--seed", "0", "--n", str(n or TRAIN_EXAMPLES[kind]), *SYNTH[kind][task]]
        procs[task] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = {}
    for task, proc in procs.items():
        output, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"drawing {task} failed (exit {proc.returncode}): {output[-2000:]}")
        seconds[task] = round(time.time() - start, 1)
    return seconds


# ------------------------------------------------------------------------------------------------
# One arm: train under a time box, then score
# ------------------------------------------------------------------------------------------------
def arm_overrides(task: str, data_dir: Path, runs_dir: Path, run_name: str, seed: int, steps: int) -> list[str]:
    """configs/paper/ as it is, but for the data drawn here, the steps, the seed and the feedback solve
    that suits the device (the recipes pin the CPU's chunked solve)."""
    seq_len = json.loads((data_dir / task / "manifest.json").read_text())["seq_len"]
    return ["--data.path", str(data_dir / task), "--runs_dir", str(runs_dir), "--run_name", run_name,
            "--train.seed", str(seed), "--train.max_steps", str(steps),
            "--train.global_batch_tokens", str(BATCH * seq_len), "--train.micro_batch_size", str(BATCH),
            "--model.feedback_impl", "auto", "--data.num_workers", "0",
            "--logging.interval", str(max(1, min(250, steps)))]


def load_arm_config(task: str, model: str, work: Path, seed: int, steps: int, extra: tuple = ()):
    """configs/paper/{task}-{model}.yaml with arm_overrides (then `extra`); a warm-up as long as the run
    (the dry run's few steps) shrinks to a tenth of it."""
    from pretrain.config import load_config

    path = ROOT / "configs" / "paper" / f"{task}-{model}.yaml"
    overrides = arm_overrides(task, work / "data", work / "runs", f"{task}-{model}-s{seed}", seed, steps)
    warmup = yaml.safe_load(path.read_text()).get("schedule", {}).get("warmup_steps", 0)
    if warmup >= steps:
        overrides += ["--schedule.warmup_steps", str(steps // 10)]
    return load_config(path, overrides + list(extra))


def train_arm(config, train_seconds: float) -> dict:
    """Trains `config` in this process; SIGTERM to this process after train_seconds (the trainer
    saves after the step in flight and returns). {"steps", "train_s", "stopped_by"}."""
    from pretrain.loop import Trainer

    start = time.time()
    trainer = Trainer(config)
    timer = threading.Timer(max(0.0, train_seconds - (time.time() - start)), os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        trainer.train()
        steps = trainer.state.step
    finally:
        timer.cancel()
        trainer.close()
    return {"steps": steps, "train_s": round(time.time() - start, 1),
            "stopped_by": "time box" if steps < config.train.max_steps else None}


def score_arm(run_dir: Path, limit: int | None, device) -> dict:
    from pretrain.evaluate.table import evaluate_run

    start = time.time()
    row = evaluate_run(run_dir, [], limit=limit, progress=False, device=device)
    row["score_s"] = round(time.time() - start, 1)
    return row


# ------------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------------
class Report:
    """paper.json / paper.md, rewritten after every arm."""

    def __init__(self, out: Path, header: dict, started: float):
        self.out, self.data, self.start = out, dict(header, arms=[], total_seconds=0.0), started

    def write(self) -> None:
        from benchmarks.gpu.paper_report import render_markdown

        self.data["total_seconds"] = round(time.time() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "paper.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out / "paper.md").write_text(render_markdown(self.data))


def _watch(deadline_holder: dict, report: Report) -> None:
    """A run past its box and GRACE_S has hung (a step that never ends ignores the SIGTERM): write what
    was measured, that run marked killed, and end the process."""
    while True:
        time.sleep(1.0)
        entry = deadline_holder.get("entry")
        if entry is not None and time.time() > deadline_holder["hard_deadline"]:
            entry["status"] = "killed"
            entry["error"] = f"no return {GRACE_S:.0f} s past its box"
            report.write()
            print(f"[paper] {entry['arm']} seed {entry['seed']}: killed past its box", flush=True)
            os._exit(3)


def run_comparison(out: Path, dry: bool, started: float, budget_s: float, steps: int, max_seeds: int,
                   limit: int | None, tasks: tuple[str, ...] = TASKS) -> dict:
    """Data, then arms and seeds until started + budget_s (epoch seconds; see the module docstring); the
    report's dict."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    if not dry and device != "cuda":
        raise SystemExit("no CUDA device: run the paper part on a GPU machine, or pass --dry-run")
    report = Report(out, {
        "schema": SCHEMA, "dry_run": dry, "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(), "torch": torch.__version__, "budget_s": budget_s,
        "steps": steps,
        "batch": BATCH, "max_seeds": max_seeds, "test_limit": limit,
        "kernels": "feedback_impl auto: " + ("Triton solve" if device == "cuda" else "chunked solve (CPU)")},
        started)
    deadline = started + budget_s
    work = Path(tempfile.mkdtemp(prefix="paper-"))
    report.data["data_s"] = prepare_data(work / "data", dry, tasks)
    report.write()
    print(f"[paper] data drawn in {max(report.data['data_s'].values())} s", flush=True)

    watched: dict = {}
    threading.Thread(target=_watch, args=(watched, report), daemon=True).start()
    seed_one_s: dict[str, float] = {}  # arm -> wall time of its seed-1 run (train + score)
    scoring_s: dict[str, float] = {}  # task -> the last scoring time
    arms = [(task, model) for task, model in ARMS if task in tasks]
    for seed in range(1, max_seeds + 1):
        for index, (task, model) in enumerate(arms):
            arm = f"{task}-{model}"
            left = deadline - time.time()
            if seed == 1:
                box = left / (len(arms) - index)
            else:  # a later seed only where its seed-1 time fits what is left
                box = seed_one_s.get(arm, float("inf"))
                if box > left:
                    continue
            entry = {"arm": arm, "task": task, "model": model, "seed": seed, "status": "running",
                     "box_s": round(box, 1), "steps_target": steps}
            report.data["arms"].append(entry)
            arm_start = time.time()
            watched.update(entry=entry, hard_deadline=arm_start + box + GRACE_S)
            try:
                train_s = max(0.0, box - scoring_s.get(task, SCORING_SHARE * box))
                config = load_arm_config(task, model, work, seed, steps)
                entry.update(train_arm(config, train_s))
                row = score_arm(config.run_dir, limit, device)
                scoring_s[task] = row["score_s"]
                entry.update(status="ok", label=row["label"], params=row["params"], tokens=row["tokens"],
                             score_s=row["score_s"], results=row["results"], kinds=row["kinds"])
            except Exception as error:  # reported; the next arm runs
                entry.update(status="failed", error=f"{type(error).__name__}: {str(error)[:300]}")
            entry["seconds"] = round(time.time() - arm_start, 1)
            watched["entry"] = None
            if seed == 1:
                seed_one_s[arm] = entry["seconds"]
            report.write()
            print(f"[paper] {arm} seed {seed}: {entry['status']}, {entry.get('steps')} of {steps} steps"
                  f"{' (stopped by its time box)' if entry.get('stopped_by') else ''}, {entry['seconds']} s of a "
                  f"{entry['box_s']} s box{': ' + entry['error'] if 'error' in entry else ''}", flush=True)
    report.write()
    return report.data


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny data and steps")
    parser.add_argument("--budget-s", type=float, help=f"wall time in all (default {GPU_BUDGET_S:.0f}; dry run "
                                                        f"{DRY_BUDGET_S:.0f})")
    parser.add_argument("--steps", type=int, help=f"steps per arm (default {GPU_STEPS}; dry run {DRY_STEPS})")
    parser.add_argument("--max-seeds", type=int, default=3, help="seeds per arm at most (1, 2, ...)")
    parser.add_argument("--limit", type=int, help="test examples per task (default: the task's 200; dry run 8)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="the tasks whose arms run")
    parser.add_argument("--started", type=float, default=time.time(),
                        help="epoch seconds the budget counts from (run.sh: its own start)")
    args = parser.parse_args(argv)
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    steps = args.steps or (DRY_STEPS if args.dry_run else GPU_STEPS)
    if budget <= 0 or steps <= 0 or args.max_seeds <= 0:
        parser.error("--budget-s, --steps and --max-seeds must be positive")
    limit = args.limit or (DRY_LIMIT if args.dry_run else None)
    data = run_comparison(args.out, args.dry_run, args.started, budget, steps, args.max_seeds, limit, tuple(args.tasks))
    print((args.out / "paper.md").read_text())
    print(f"[paper] wrote {args.out / 'paper.json'} and {args.out / 'paper.md'}")
    return 0 if all(arm["status"] == "ok" for arm in data["arms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
