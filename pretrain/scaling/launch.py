"""Run a planned sweep, locally or as SLURM job arrays, with a registry keyed by config hash.

Registry (`<sweep>/registry.json`): config hash -> {name, status, attempts, git_commit, reason}.
Status is one of pending, done, failed (the process died: node failure, OOM, preemption), or
diverged (a non-finite or spiking training loss). Re-running `launch` skips done and diverged
points (a diverged run is flagged for a human, never silently retried or dropped), reruns failed
points until `max_attempts`, and runs the rest. A point's run directory resumes from its `latest`
checkpoint, so a retry continues rather than restarts.

Ladder branches (`fork_of`) start from their main run's checkpoint at `fork_step`: the launcher
copies it into the branch's run directory, and the branch's own config (its WSD decay starts at
the fork) takes over from there. Mains run first; a branch whose main is not done waits.

  local  one point after another on this machine (`python -m pretrain`, the real trainer).
  slurm  `python -m launch.slurm --sweep` (launch/slurm's sbatch script and submit code): a job
         array for the mains (`--max-parallel K`, one config per task) and a second array of
         branches with `--dependency=afterany:<mains>`. A task requeues itself while its
         checkpoint advances (launch/slurm); `launch` again resubmits failed points, counting one
         attempt per submission, up to `max_attempts`.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .collect import divergence, read_metrics

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


class Registry:
    def __init__(self, sweep: Path):
        self.path = Path(sweep) / "registry.json"
        self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, point: dict) -> dict:
        return self.entries.setdefault(point["config_hash"], {"name": point["name"], "status": "pending",
                                                              "attempts": 0, "git_commit": "", "reason": ""})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def fork_checkpoint(sweep: Path, point: dict) -> None:
    """Seed a branch's run directory with its main run's checkpoint at the fork step."""
    checkpoints = sweep / "runs" / point["name"] / "checkpoints"
    if (checkpoints / "latest").exists():
        return  # already forked (a retry resumes from the branch's own checkpoints)
    step_dir = f"iter_{point['fork_step']:07d}"
    source = sweep / "runs" / point["fork_of"] / "checkpoints" / step_dir
    if not source.is_dir():
        raise FileNotFoundError(f"{point['name']}: its main run {point['fork_of']} has no checkpoint {source}")
    checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, checkpoints / step_dir, dirs_exist_ok=True)
    (checkpoints / "latest").write_text(str(point["fork_step"]))


def classify(sweep: Path, point: dict, returncode: int) -> tuple[str, str]:
    """(status, reason) of a finished attempt."""
    records = read_metrics(sweep / "runs" / point["name"] / "metrics.jsonl")
    reason = divergence(records, point["warmup_steps"])
    if reason:
        return "diverged", reason
    finished = any(r.get("step") == point["steps"] and "train/loss" in r for r in records)
    if returncode == 0 and finished:
        return "done", ""
    return "failed", f"exit code {returncode}" + ("" if finished else f", stopped before step {point['steps']}")


def train_command(sweep: Path, point: dict) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--config",
            str(sweep / "configs" / f"{point['name']}.yaml")]


def _ordered(points: list[dict]) -> list[dict]:
    return [p for p in points if not p["fork_of"]] + [p for p in points if p["fork_of"]]


def launch_local(sweep: str | Path, max_attempts: int = 2, timeout_s: float = 3600, env: dict | None = None) -> dict:
    """Run every point that is not done; returns {name: status} of what ran (empty: nothing to do)."""
    sweep = Path(sweep)
    plan = json.loads((sweep / "plan.json").read_text())
    registry = Registry(sweep)
    commit = git_commit()
    ran = {}
    by_name = {p["name"]: p for p in plan["points"]}
    started = time.time()
    for point in _ordered(plan["points"]):
        entry = registry.get(point)
        if entry["status"] in ("done", "diverged") or entry["attempts"] >= max_attempts:
            continue
        if point["fork_of"]:
            main = registry.get(by_name[point["fork_of"]])
            if main["status"] != "done":
                entry["reason"] = f"waiting for {point['fork_of']} ({main['status']})"
                continue
            fork_checkpoint(sweep, point)
        entry["attempts"] += 1
        entry["git_commit"] = commit
        registry.save()
        run_env = dict(os.environ if env is None else env)
        run_env["PYTHONPATH"] = str(REPO) + os.pathsep + run_env.get("PYTHONPATH", "")
        try:
            done = subprocess.run(train_command(sweep, point), cwd=REPO, env=run_env, timeout=timeout_s,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            returncode, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as err:
            returncode, output = -9, (err.stdout or "") if isinstance(err.stdout, str) else ""
        run_dir = sweep / "runs" / point["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "launch.log").write_text(output[-20000:])
        entry["status"], entry["reason"] = classify(sweep, point, returncode)
        (run_dir / "scaling.json").write_text(json.dumps({"git_commit": commit, **entry}))
        registry.save()
        ran[point["name"]] = entry["status"]
    total = json.loads((sweep / "launch.json").read_text()).get("elapsed_s", 0.0) if (sweep / "launch.json").exists() else 0.0
    (sweep / "launch.json").write_text(json.dumps({"elapsed_s": total + time.time() - started}))
    return ran


def _live_jobs(sweep: Path) -> list[str]:
    """The sweep's submitted jobs (slurm/jobs.json) that SLURM still has queued or running."""
    path = sweep / "slurm" / "jobs.json"
    jobs = list(json.loads(path.read_text()).values()) if path.exists() else []
    if not jobs:
        return []
    done = subprocess.run(["squeue", "-h", "-o", "%A", "-j", ",".join(jobs)], capture_output=True, text=True)
    return sorted(set(done.stdout.split()) & set(jobs)) if done.returncode == 0 else []


def launch_slurm(sweep: str | Path, max_attempts: int = 2, throttle: int = 4, launch_args: list[str] = (),
                 dry_run: bool = False) -> dict:
    """Submit the points not done as job arrays of `python -m launch.slurm --sweep` (launch/slurm's
    sbatch script, run lock, launch records, requeue while a task's checkpoint advances): the mains,
    then the branches with --dependency=afterany:<mains>, each branch seeded from its main's
    checkpoint at fork_step when its task starts (fork.json, launch.slurm.job.seed_from_fork).
    `launch_args` go to launch.slurm as they are (e.g. --gpus-per-node 1, --time 4:00:00). A point
    counts one attempt per submission; the next call resubmits failed points below max_attempts.
    Returns {"mains": job id, "branches": job id} of what it submitted (dry_run: the sbatch commands
    launch.slurm would run, and nothing recorded)."""
    sweep = Path(sweep).resolve()
    live = _live_jobs(sweep)
    if live:
        raise RuntimeError(f"the sweep's jobs {', '.join(live)} are still queued or running; wait for them or "
                           f"scancel them before launching again")
    sync_slurm_registry(sweep, max_attempts)
    plan = json.loads((sweep / "plan.json").read_text())
    registry, commit = Registry(sweep), git_commit()
    (sweep / "slurm").mkdir(exist_ok=True)
    jobs, dependency = {}, []
    for kind, chosen in (("mains", [p for p in plan["points"] if not p["fork_of"]]),
                         ("branches", [p for p in plan["points"] if p["fork_of"]])):
        todo = [p for p in chosen if registry.get(p)["status"] not in ("done", "diverged")
                and registry.get(p)["attempts"] < max_attempts]
        if not todo:
            continue
        for point in todo if kind == "branches" else ():
            run_dir = sweep / "runs" / point["name"]
            run_dir.mkdir(parents=True, exist_ok=True)
            source = sweep / "runs" / point["fork_of"] / "checkpoints" / f"iter_{point['fork_step']:07d}"
            (run_dir / "fork.json").write_text(json.dumps({"source": str(source), "step": point["fork_step"]}))
        lines = sweep / "slurm" / f"{kind}.txt"
        lines.write_text("".join(f"{sweep / 'configs' / (p['name'] + '.yaml')}\n" for p in todo))
        command = [sys.executable, "-m", "launch.slurm", "--sweep", str(lines), "--max-parallel", str(throttle),
                   "--job-name", f"scaling-{kind}", "--logs", str(sweep / "slurm"), *dependency, *launch_args,
                   *(["--dry-run"] if dry_run else [])]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
        if dry_run:
            jobs[kind] = done.stdout.strip()
            dependency = ["--dependency", "afterany:<mains>"]
            continue
        jobs[kind] = done.stdout.split()[-1]
        for point in todo:
            entry = registry.get(point)
            entry.update(status="submitted", attempts=entry["attempts"] + 1, git_commit=commit,
                         reason=f"job {jobs[kind]}")
        if kind == "mains":
            dependency = ["--dependency", f"afterany:{jobs[kind]}"]
    if not dry_run:
        registry.save()
        (sweep / "slurm" / "jobs.json").write_text(json.dumps(jobs))
    return jobs


def sync_slurm_registry(sweep: Path, max_attempts: int = 2) -> None:
    """Fold submitted points' outcomes into the registry once their jobs have left the queue: the
    launch records launch/slurm writes under runs/<point>/launches/ (exit code, decision) and the
    metrics (done, diverged); a point whose task never started training is failed."""
    sweep = Path(sweep)
    if _live_jobs(sweep):
        return
    plan = json.loads((sweep / "plan.json").read_text())
    registry = Registry(sweep)
    for point in plan["points"]:
        entry = registry.get(point)
        if entry["status"] != "submitted":
            continue
        run_dir = sweep / "runs" / point["name"]
        records = sorted((json.loads(p.read_text()) for p in (run_dir / "launches").glob("*.json")),
                         key=lambda r: (r["started"], r["restart"])) if (run_dir / "launches").is_dir() else []
        if records and "exit_code" in records[-1]:
            entry["status"], entry["reason"] = classify(sweep, point, records[-1]["exit_code"])
        else:
            entry["status"], entry["reason"] = "failed", (f"{entry['reason']}: the array task ended before training "
                                                          f"started or while it ran; see {sweep / 'slurm'}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "scaling.json").write_text(json.dumps(entry))
    registry.save()
