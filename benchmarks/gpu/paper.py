"""The paper's comparison in a GPU window (issue 30): every arm of configs/paper/ trained at full length
and scored on its test split, inside one time box.

    bash benchmarks/gpu/run.sh --part paper              # on the GPU: 240 s in all -> $OUT/paper.json, paper.md
    bash benchmarks/gpu/run.sh --part paper --dry-run    # on CPU: tiny data and steps, the same files
    python benchmarks/gpu/paper.py --out DIR [--dry-run] [--budget-s S] [--steps N [TASK=N ...]] [--max-seeds K]
        [--lanes L] [--tasks ...] [--models ...] [--limit N] [--work DIR]

What it does, on `--lanes` worker processes that take the runs in turn (default: all eight arms of a seed
at once on a GPU, where a 0.2M-parameter model leaves the device idle between its kernel launches and
eight processes share it; one lane in a dry run). A lane imports once and runs its arms in-process:
1. draws both tasks' data with the generators of data_pipeline.synthetic into a temporary folder (both
   at once, two processes, while the lanes import): two-style at the paper's 400-600 symbols (20 classes; 640-token
   sequences) and Diffuse MQAR with configs/paper/'s knobs (32 pairs, trained lags up to 6, test lags
   up to 24);
2. trains the arms (Sessa, Transformer++, Sessa without feedback, Mamba-2 on each task) with the
   recipes of configs/paper/, 3000 steps of batch 16 each (the same for every arm, as in the paper;
   `--steps 3000 diffuse-mqar=2000 two-style-sessa=4000` gives a task or an arm its own count),
   seed 1 for every arm first, then seeds 2, 3, ... for every arm while the time left fits one more
   arm of that seed (an arm of a later seed is started only when its seed-1 run reached all its steps
   and 1.2 times its seed-1 time fits: its box);
3. scores each run right after it trains on its task's test split with pretrain.evaluate (the
   table's own evaluate_run: checkpoint, task and knobs read from the run) on this device.

Time boxes (next_box): a seed-1 run's box is the time left shared by the seed-1 arms not yet started over
the lanes, left x min(lanes, n) / n, at most --max-box-s (the last scoring time of its task, or a fifth of
the box, is held back for its own scoring). At the end of its training time the trainer gets SIGTERM, the stop signal a
cluster sends: it finishes the step in flight, saves and returns; the run is scored at the step it
reached and marked `"stopped_by": "time box"`. A lane that does not return within its box plus GRACE_S
is killed (the run marked "killed") and replaced. paper.json and paper.md are rewritten after every run.

Kernels: feedback_impl "auto" for every Sessa arm (the fused Triton solve on CUDA, the chunked solve on
CPU); neither CUDA graphs nor torch.compile (see docs/gpu_check.md).
"""
import argparse
import datetime
import json
import os
import queue
import shutil
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
GRACE_S = 30.0  # past its box, a lane that has not returned (a hung step) is killed
SCORING_SHARE = 0.2  # of an arm's box held back for its scoring until one of its task was timed
LANE_START_S = 120.0  # a lane's imports take seconds; one that has not started in this time is broken
LATER_SEED_MARGIN = 1.2  # a seed after the first gets its seed-1 time times this as its box

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


def train_arm(config, train_deadline: float) -> dict:
    """Trains `config` in this process; SIGTERM to this process at train_deadline (epoch seconds: the
    trainer saves after the step in flight and returns). {"steps", "train_s", "stopped_by"}."""
    from pretrain.loop import Trainer

    start = time.time()
    trainer = Trainer(config)
    timer = threading.Timer(max(0.0, train_deadline - time.time()), os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        trainer.train()
        steps = trainer.state.step
    finally:
        timer.cancel()
        trainer.close()
    return {"steps": steps, "train_s": round(time.time() - start, 1),
            "stopped_by": "time box" if steps < config.train.max_steps else None}


def score_arm(run_dir: Path, limit: int | None, device: str) -> dict:
    from pretrain.evaluate.table import evaluate_run

    start = time.time()
    row = evaluate_run(run_dir, [], limit=limit, progress=False, device=device)
    return {"status": "ok", "label": row["label"], "params": row["params"], "tokens": row["tokens"],
            "results": row["results"], "kinds": row["kinds"], "score_s": round(time.time() - start, 1)}


def _next_job(jobs, parent: int) -> dict | None:
    """The next job, or None when told to stop or when the parent is gone (killed: nobody to report to)."""
    while os.getppid() == parent:
        try:
            return jobs.get(timeout=2.0)
        except queue.Empty:
            continue
    return None


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the orchestrator ends, however it ends (a lane left behind
    would hold the caller's output pipe open)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent check of _next_job remains


def _worker(jobs, results, parent: int, threads: int) -> None:
    """A lane: runs jobs {"id", "task", "model", "seed", "steps", "work", "limit", "device",
    "train_deadline"} until None, one result dict per job, with `threads` CPU threads (the lanes share
    the cores). The imports come before the first job."""
    _die_with_parent()
    import torch

    import pretrain.evaluate.table
    import pretrain.loop  # noqa: F401

    torch.set_num_threads(min(torch.get_num_threads(), threads))

    results.put({"ready": os.getpid()})
    while (job := _next_job(jobs, parent)) is not None:
        result = {"id": job["id"]}
        try:
            config = load_arm_config(job["task"], job["model"], Path(job["work"]), job["seed"], job["steps"])
            result.update(train_arm(config, job["train_deadline"]))
            result.update(score_arm(config.run_dir, job["limit"], job["device"]))
        except Exception as error:  # reported; the lane takes the next job
            result.update(status="failed", error=f"{type(error).__name__}: {str(error)[:300]}")
        results.put(result)


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


class Lanes:
    """`count` worker processes (spawned: CUDA is initialised in each), a job queue each, one result queue."""

    def __init__(self, count: int):
        import multiprocessing

        self.threads = max(1, (os.cpu_count() or 1) // count)
        self.context = multiprocessing.get_context("spawn")
        self.results = self.context.Queue()
        self.lanes = [self._start() for _ in range(count)]

    def _start(self) -> dict:
        jobs = self.context.Queue()
        # not a daemon: the trainer's data loader may start processes of its own
        process = self.context.Process(target=_worker, args=(jobs, self.results, os.getpid(), self.threads))
        process.start()
        return {"process": process, "jobs": jobs, "job": None}

    def idle(self) -> list[dict]:
        return [lane for lane in self.lanes if lane["job"] is None]

    def busy(self) -> list[dict]:
        return [lane for lane in self.lanes if lane["job"] is not None]

    def replace(self, lane: dict, restart: bool) -> None:
        """A hung or dead lane's process is killed; with restart a fresh one takes its place."""
        lane["process"].kill()
        lane["process"].join()
        index = next(i for i, other in enumerate(self.lanes) if other is lane)
        if restart:
            self.lanes[index] = self._start()
        else:
            del self.lanes[index]

    def close(self) -> None:
        """Every lane told to stop, and killed if it has not within 30 s; so is any other child left
        (a lane that replaced a killed one may still be starting)."""
        import multiprocessing

        for lane in self.lanes:
            lane["jobs"].put(None)
        for lane in self.lanes:
            lane["process"].join(timeout=30)
        for process in multiprocessing.active_children():
            process.kill()
            process.join(timeout=10)


def next_box(seed: int, arm: str, left: float, lanes: int, seed_one_left: int, seed_one_s: dict,
             max_box_s: float = float("inf")) -> float | None:
    """The time box of the next run, or None when it should not start. Seed 1: the time left shared by
    the seed-1 arms not yet started over the lanes (left x min(lanes, n) / n), at most max_box_s. A
    later seed: 1.2x the arm's seed-1 time, if its seed-1 run reached all its steps and that fits the
    time left."""
    if seed == 1:
        box = min(max_box_s, left * min(lanes, seed_one_left) / seed_one_left)
        return box if box > 0 else None
    box = seed_one_s.get(arm, float("inf")) * LATER_SEED_MARGIN
    return box if box <= left else None


def run_comparison(out: Path, work: Path, dry: bool, started: float, budget_s: float, steps: dict[str, int],
                   max_seeds: int, limit: int | None, arms: list[tuple[str, str]] = ARMS, lanes: int = 1,
                   max_box_s: float = float("inf")) -> dict:
    """Data (work/data), then arms and seeds (work/runs) on `lanes` worker processes until started +
    budget_s (epoch seconds; see the module docstring); the report's dict."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    if not dry and device != "cuda":
        raise SystemExit("no CUDA device: run the paper part on a GPU machine, or pass --dry-run")
    report = Report(out, {
        "schema": SCHEMA, "dry_run": dry, "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(), "torch": torch.__version__, "budget_s": budget_s, "steps": steps,
        "batch": BATCH, "max_seeds": max_seeds, "test_limit": limit, "lanes": lanes,
        "max_box_s": None if max_box_s == float("inf") else max_box_s,
        "kernels": "feedback_impl auto: " + ("Triton solve" if device == "cuda" else "chunked solve (CPU)")},
        started)
    deadline = started + budget_s
    pool = Lanes(lanes)  # the workers import while the data is drawn
    try:
        report.data["data_s"] = prepare_data(work / "data", dry, tuple(dict.fromkeys(task for task, _ in arms)))
        report.write()
        print(f"[paper] data drawn in {max(report.data['data_s'].values())} s", flush=True)
        for _ in range(lanes):  # every lane has imported: no run's box pays for it (a late start leaves
            try:  # no time to the runs, which are then listed as skipped)
                pool.results.get(timeout=max(LANE_START_S, deadline - time.time()))
            except queue.Empty:
                raise RuntimeError(f"a worker process did not start in {LANE_START_S:.0f} s") from None
        _schedule(pool, report, work, deadline, steps, max_seeds, limit, arms, device, max_box_s)
    finally:
        pool.close()
        report.write()
    return report.data


def _schedule(pool: Lanes, report: Report, work: Path, deadline: float, steps: dict[str, int], max_seeds: int,
              limit: int | None, arms: list[tuple[str, str]], device: str, max_box_s: float) -> None:
    """Seed 1 of every arm first, later seeds while they fit; a lane past its box + GRACE_S is killed."""
    todo = [(seed, task, model) for seed in range(1, max_seeds + 1) for task, model in arms]
    entries: list[dict] = report.data["arms"]
    seed_one_s: dict[str, float] = {}  # arm -> wall time of its complete seed-1 run (train + score)
    scoring_s: dict[str, float] = {}  # task -> the last scoring time
    while todo or pool.busy():
        while todo and pool.idle():
            seed, task, model = todo[0]
            if seed > 1 and any(entry["seed"] == 1 and entry["status"] == "running" for entry in entries):
                break  # later seeds wait for every seed-1 time
            todo.pop(0)
            arm = f"{task}-{model}"
            now = time.time()
            box = next_box(seed, arm, deadline - now, len(pool.lanes), sum(1 for s, _, _ in todo if s == 1) + 1,
                           seed_one_s, max_box_s)
            if box is None and seed > 1:
                continue  # a later seed that does not fit: not run, not listed
            entry = {"arm": arm, "task": task, "model": model, "seed": seed, "box_s": round(box or 0.0, 1),
                     "steps_target": steps[arm], "id": len(entries)}
            entries.append(entry)
            if box is None:
                entry.update(status="skipped", error="no time left")
                continue
            lane = pool.idle()[0]
            reserve = scoring_s.get(task, SCORING_SHARE * box)
            entry.update(status="running", start=now, hard_deadline=now + box + GRACE_S,
                         started_at_s=round(now - report.start, 2))
            lane["job"] = entry
            lane["jobs"].put({"id": entry["id"], "task": task, "model": model, "seed": seed, "steps": steps[arm],
                              "work": str(work), "limit": limit, "device": device,
                              "train_deadline": now + max(0.0, box - reserve)})
            print(f"[paper] {arm} seed {seed}: started, a {box:.1f} s box", flush=True)
        try:
            result = pool.results.get(timeout=1.0)
        except queue.Empty:
            result = None
        for lane in pool.busy():
            entry = lane["job"]
            if result is not None and result.get("id") == entry["id"]:  # a restarted lane's "ready" has none
                entry.update(result)
            elif not lane["process"].is_alive():  # a crash (a signal, the OOM killer): no result will come
                entry.update(status="failed", error=f"the lane's process died (exit {lane['process'].exitcode})")
                pool.replace(lane, restart=bool(todo))
            elif time.time() > entry["hard_deadline"]:
                pool.replace(lane, restart=bool(todo))
                entry.update(status="killed", error=f"no return {GRACE_S:.0f} s past its box")
            else:
                continue
            lane["job"] = None
            entry["seconds"] = round(time.time() - entry.pop("start"), 1)
            del entry["hard_deadline"]
            if entry["status"] == "ok":
                scoring_s[entry["task"]] = entry["score_s"]
                if entry["seed"] == 1 and not entry["stopped_by"]:
                    seed_one_s[entry["arm"]] = entry["seconds"]
            report.write()
            print(f"[paper] {entry['arm']} seed {entry['seed']}: {entry['status']}, {entry.get('steps')} of "
                  f"{entry['steps_target']} "
                  f"steps{' (stopped by its time box)' if entry.get('stopped_by') else ''}, {entry['seconds']} s of "
                  f"a {entry['box_s']} s box{': ' + entry['error'] if 'error' in entry else ''}", flush=True)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_steps(items: list[str], default: int, error) -> dict[str, int]:
    """["3000", "diffuse-mqar=2000", "two-style-sessa=4000"] -> {arm: steps} for every arm "task-model"
    (a task's count applies to its arms, an arm's to itself, in that order); error(message) otherwise."""
    names = {f"{task}-{model}": task for task, model in ARMS}
    counts: dict[str, int] = {}
    for item in items:
        key, _, count = item.rpartition("=")
        if key and key not in TASKS and key not in names:
            error(f"--steps {item}: {key!r} is neither a task ({', '.join(TASKS)}) nor an arm (TASK-MODEL, "
                  f"models {', '.join(MODELS)})")
        if not count.isdigit() or int(count) <= 0:
            error(f"--steps {item}: the steps must be a positive integer")
        counts[key] = int(count)
    return {arm: counts.get(arm, counts.get(task, counts.get("", default))) for arm, task in names.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny data and steps")
    parser.add_argument("--budget-s", type=float, help=f"wall time in all (default {GPU_BUDGET_S:.0f}; dry run "
                                                        f"{DRY_BUDGET_S:.0f})")
    parser.add_argument("--steps", nargs="+", default=[], metavar="N|TASK=N",
                        help=f"steps per arm, and a task's or an arm's own (default {GPU_STEPS}; dry run "
                             f"{DRY_STEPS})")
    parser.add_argument("--max-box-s", type=float, default=float("inf"),
                        help="no seed-1 run gets a longer box (default: no bound; e.g. to leave time for seed 2)")
    parser.add_argument("--max-seeds", type=int, default=3, help="seeds per arm at most (1, 2, ...)")
    parser.add_argument("--limit", type=int, help="test examples per task (default: the task's 200; dry run 8)")
    parser.add_argument("--lanes", type=int, help="runs at once, each in a worker process of its own (default: "
                                                   "every arm of a seed on a GPU, one in a dry run)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="the tasks whose arms run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="the models whose arms run")
    parser.add_argument("--work", type=Path, help="keep the data and runs here (default: a temporary folder, "
                                                  "removed at the end)")
    parser.add_argument("--started", type=float, default=time.time(),
                        help="epoch seconds the budget counts from (run.sh: its own start)")
    args = parser.parse_args(argv)
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    steps = parse_steps(args.steps, DRY_STEPS if args.dry_run else GPU_STEPS, parser.error)
    if budget <= 0 or args.max_seeds <= 0 or (args.lanes is not None and args.lanes <= 0):
        parser.error("--budget-s, --max-seeds and --lanes must be positive")
    limit = args.limit or (DRY_LIMIT if args.dry_run else None)
    work = args.work or Path(tempfile.mkdtemp(prefix="paper-"))
    try:
        arms = [(task, model) for task, model in ARMS if task in args.tasks and model in args.models]
        lanes = args.lanes or (1 if args.dry_run else len(arms))
        data = run_comparison(args.out, work, args.dry_run, args.started, budget, steps, args.max_seeds, limit,
                              arms, lanes, args.max_box_s)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print((args.out / "paper.md").read_text())
    print(f"[paper] wrote {args.out / 'paper.json'} and {args.out / 'paper.md'}")
    return 1 if any(arm["status"] in ("failed", "killed") for arm in data["arms"]) else 0


if __name__ == "__main__":
    sys.exit(main())
