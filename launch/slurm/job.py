"""The job-side steps around one training attempt, shared by `pretrain.sbatch` and `launch/local.sh`.

    eval "$(python -m launch.slurm.job begin [--sweep FILE --index I] [--owner O] -- --config X.yaml [overrides])"
    ... start the ranks ...
    python -m launch.slurm.job end --rc $? --run-dir "$RUN_DIR" --max-steps "$MAX_STEPS" \
        --start-step "$START_STEP" --owner "$SESSA_RUN_LOCK_OWNER" --record "$RECORD" [--requeue]
    # prints done | requeue | stopped | failed

`begin` resolves the run directory, takes its lock (pretrain/runlock.py), seeds a new run from the
checkpoint its fork.json names (seed_from_fork), records the launch (job,
nodes, command, git commit and diff, the recipe file) under `runs/<run>/launches/`, and prints shell
assignments: RUN_DIR, MAX_STEPS, START_STEP, RECORD, SESSA_RUN_LOCK_OWNER and the TRAIN_ARGS array.
Exit status 3: the run has already reached max_steps; 4: another live job owns the run; 2: bad input.

`end` decides what happens after the ranks have exited, from the checkpoint the run reached:
- `done`: `latest` has reached max_steps;
- `requeue` (only with --requeue): not done, the attempt advanced `latest`, and SLURM_RESTART_COUNT
  is below --max-restarts, whatever the ranks' exit status. This covers a clean stop on the time-limit
  signal, a crash after a checkpoint and a hang (pretrain/watchdog.py exits 7); a run that makes no
  progress is never requeued;
- `stopped`: not done, progress made, no requeue (chain mode: the next job continues);
- `failed`: not done and no progress in this attempt.
The lock is released except on `requeue` (the requeued job keeps its id and re-enters it).

Deliberately free of torch: it runs in the batch script on every (re)start. The run directory and
max_steps come from the recipe YAML and overrides with pretrain.config's defaults and override rules
(tests/launch/test_launch_units.py checks that both agree).
"""
import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pretrain.runlock import LOCK_NAME, OWNER_ENV, RunLock, RunLockedError, acquire_run_lock, current_owner

REPO = Path(__file__).resolve().parents[2]

EXIT_FINISHED, EXIT_LOCKED, EXIT_BAD_INPUT = 3, 4, 2
DEFAULT_RUNS_DIR, DEFAULT_RUN_NAME, DEFAULT_MAX_STEPS = "runs", "tiny", 100  # = pretrain.config defaults
SLURM_RECORDED = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                  "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "SLURM_JOB_PARTITION",
                  "SLURM_JOB_ACCOUNT", "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE", "SLURM_SUBMIT_DIR")


class BadInput(ValueError):
    pass


# --- the run a command line trains ---------------------------------------------------------------
def split_train_args(train_args: list[str]) -> tuple[str, list[str]]:
    """[--config X, overrides...] -> (X, overrides), accepting --config=X anywhere like `python -m pretrain`."""
    args, config, rest = list(train_args), None, []
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise BadInput("--config has no value")
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if config is None:
        raise BadInput("no --config given (e.g. --config configs/tiny.yaml)")
    return config, rest


def resolve_run(train_args: list[str]) -> tuple[Path, int]:
    """(run directory, train.max_steps) of `python -m pretrain <train_args>`, without importing torch."""
    config, overrides = split_train_args(train_args)
    try:
        tree = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BadInput(f"cannot read {config}: {err}") from None
    while overrides:  # the same rules as pretrain.config.load_config
        flag = overrides.pop(0)
        if "=" in flag:
            flag, value = flag.split("=", 1)
        elif overrides:
            value = overrides.pop(0)
        else:
            raise BadInput(f"override {flag} has no value")
        *parents, leaf = flag.removeprefix("--").split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    runs_dir, run_name = tree.get("runs_dir", DEFAULT_RUNS_DIR), tree.get("run_name", DEFAULT_RUN_NAME)
    stage_steps = [stage.get("steps") if isinstance(stage, dict) else None for stage in tree.get("stages") or []]
    if stage_steps and all(isinstance(n, int) for n in stage_steps):  # a campaign's length is its stages'
        default = sum(stage_steps)
    else:
        default = DEFAULT_MAX_STEPS
    max_steps = (tree.get("train") or {}).get("max_steps", default)
    return Path(str(runs_dir)) / str(run_name), int(max_steps)


def read_sweep(path: str | Path) -> list[list[str]]:
    """A sweep file: one run per line, `<recipe.yaml> [--section.field value ...]`; # comments."""
    runs = []
    for line in Path(path).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            if words[0] == "--config":
                words = words[1:]
            runs.append(["--config", *words])
    if not runs:
        raise BadInput(f"sweep file {path} lists no runs")
    return runs


def sweep_entry(path: str | Path, index: int, common: list[str]) -> list[str]:
    """Train arguments of array index `index`: the line's recipe, the common overrides, then the line's own."""
    runs = read_sweep(path)
    if not 0 <= index < len(runs):
        raise BadInput(f"array index {index} is outside the {len(runs)} runs of {path}")
    config, line_overrides = split_train_args(runs[index])
    return ["--config", config, *common, *line_overrides]


def latest_step(run_dir: Path) -> int:
    """The step of `checkpoints/latest` (0 when none), as checkpoints.CheckpointManager writes it."""
    pointer = run_dir / "checkpoints" / "latest"
    try:
        text = pointer.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() and (pointer.parent / f"iter_{int(text):07d}").is_dir() else 0


FORK_FILE = "fork.json"


def seed_from_fork(run_dir: Path) -> None:
    """A run directory holding fork.json, {"source": <checkpoint step directory>, "step": N}, and no
    checkpoint yet starts from a copy of that checkpoint (a scaling ladder's cooldown branch forks
    its main run: pretrain/scaling/launch.py writes the file)."""
    fork, checkpoints = run_dir / FORK_FILE, run_dir / "checkpoints"
    if not fork.is_file() or latest_step(run_dir):
        return
    spec = json.loads(fork.read_text())
    source = Path(spec["source"])
    if not source.is_dir():
        raise BadInput(f"{fork}: the checkpoint to start from, {source}, does not exist (has that run reached "
                       f"step {spec['step']}?)")
    checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, checkpoints / source.name, dirs_exist_ok=True)
    (checkpoints / "latest").write_text(str(spec["step"]))


# --- the launch record ----------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def record_launch(run_dir: Path, train_args: list[str], start_step: int, owner: str) -> Path:
    """runs/<run>/launches/<time>-<job>.json (+ .yaml copy of the recipe, + .diff when the tree is dirty)."""
    env = os.environ
    tag = (f"job{env['SLURM_JOB_ID']}-r{env.get('SLURM_RESTART_COUNT', '0')}" if env.get("SLURM_JOB_ID")
           else f"local{os.getpid()}")
    folder = run_dir / "launches"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"
    config, _ = split_train_args(train_args)
    shutil.copyfile(config, base.with_suffix(".yaml"))
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    diff = _git("diff", "HEAD")
    if diff:
        base.with_suffix(".diff").write_text(diff)
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "owner": owner,
        "cwd": os.getcwd(), "train_args": train_args, "start_step": start_step,
        "restart": int(env.get("SLURM_RESTART_COUNT", "0")),
        "launcher": env.get("SESSA_LAUNCH", "local"), "ranks_per_node": env.get("SESSA_RANKS_PER_NODE"),
        "git": {"commit": commit, "dirty": bool(diff), "branch": (_git("rev-parse", "--abbrev-ref", "HEAD") or "").strip()},
        "slurm": {k: env[k] for k in SLURM_RECORDED if k in env},
    }
    path = base.with_suffix(".json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


# --- begin / end ---------------------------------------------------------------------------------
def begin(args) -> int:
    train_args = args.train_args
    if args.sweep is not None:
        train_args = sweep_entry(args.sweep, args.index, train_args)
    run_dir, max_steps = resolve_run(train_args)
    start = latest_step(run_dir)
    if start >= max_steps:
        print(f"echo 'run {run_dir} already reached step {start} of {max_steps}: nothing to do'")
        return EXIT_FINISHED
    owner = args.owner or current_owner()
    try:
        acquire_run_lock(run_dir, owner)
    except RunLockedError as err:
        print(f"cannot start: {err}", file=sys.stderr)
        return EXIT_LOCKED
    try:
        seed_from_fork(run_dir)
    except BadInput:
        RunLock(run_dir / LOCK_NAME, owner).release()
        raise
    start = latest_step(run_dir)
    record = record_launch(run_dir, train_args, start, owner)
    assignments = {"RUN_DIR": str(run_dir), "MAX_STEPS": str(max_steps), "START_STEP": str(start),
                   "RECORD": str(record), OWNER_ENV: owner}
    for name, value in assignments.items():
        print(f"{name}={shlex.quote(value)}")
    print(f"export {OWNER_ENV}")
    print(f"TRAIN_ARGS=({' '.join(shlex.quote(a) for a in train_args)})")
    return 0


def decide(run_dir: Path, max_steps: int, start_step: int, requeue: bool, max_restarts: int) -> str:
    reached = latest_step(run_dir)
    if reached >= max_steps:
        return "done"
    if reached <= start_step:
        return "failed"
    if requeue and int(os.environ.get("SLURM_RESTART_COUNT", "0")) < max_restarts:
        return "requeue"
    return "stopped"


def end(args) -> int:
    run_dir = Path(args.run_dir)
    decision = decide(run_dir, args.max_steps, args.start_step, args.requeue, args.max_restarts)
    if decision != "requeue":
        RunLock(run_dir / LOCK_NAME, args.owner).release()
    if args.record and Path(args.record).is_file():
        record = json.loads(Path(args.record).read_text())
        record.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), exit_code=args.rc, decision=decision,
                      reached_step=latest_step(run_dir))
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    print(decision)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm.job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("begin", help="resolve the run, take its lock, record the launch, print shell variables")
    b.add_argument("--sweep", help="sweep file (one run per line); used with --index")
    b.add_argument("--index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")),
                   help="line of the sweep file (default: $SLURM_ARRAY_TASK_ID)")
    b.add_argument("--owner", help="lock owner (default: the SLURM job, else this process)")
    b.add_argument("train_args", nargs=argparse.REMAINDER, help="-- --config X.yaml [--section.field value ...]")
    e = sub.add_parser("end", help="decide done | requeue | stopped | failed and release the lock unless requeued")
    e.add_argument("--rc", type=int, required=True, help="exit status of the ranks")
    e.add_argument("--requeue", action="store_true", help="requeueing is allowed")
    e.add_argument("--max-restarts", type=int, default=int(os.environ.get("SESSA_MAX_RESTARTS", "20")))
    e.add_argument("--run-dir", required=True)  # these four: what begin printed
    e.add_argument("--max-steps", type=int, required=True)
    e.add_argument("--start-step", type=int, required=True)
    e.add_argument("--owner", required=True)
    e.add_argument("--record", help="launch record to complete with the outcome")
    args = parser.parse_args(argv)
    if args.command == "begin":
        if args.train_args[:1] == ["--"]:
            args.train_args = args.train_args[1:]
        try:
            return begin(args)
        except BadInput as err:
            print(f"launch error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return end(args)


if __name__ == "__main__":
    sys.exit(main())
